//! Single flight: concurrent cache misses for one profile wait for one database read instead of
//! each reading it (a stampede when a hot profile's entry expires or is replaced).
//!
//! A miss joins the flight of its key: the first reader takes it and reads the database; the
//! others wait, then look in the cache again, where the first one's fill is. Per replica: each
//! replica reads a hot profile at most once per change, however many clients ask.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// The flights in progress, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A place in a flight, held until dropped.
#[derive(Debug)]
pub(crate) struct Flight<'a> {
    flights: &'a Flights,
    key: String,
    /// Whether another reader held the flight first (its result may be in the cache now).
    pub(crate) waited: bool,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Flights {
    /// Joins the flight of `key`: returns at once when there is none, else when the readers
    /// before have finished.
    pub(crate) async fn join(&self, key: &str) -> Flight<'_> {
        let lock = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(key.to_owned()).or_default().clone()
        };
        let (guard, waited) = match lock.clone().try_lock_owned() {
            Ok(guard) => (guard, false),
            Err(_) => {
                metrics::counter!("tessera_profile_cache_single_flight_waits_total").increment(1);
                (lock.lock_owned().await, true)
            }
        };
        Flight {
            flights: self,
            key: key.to_owned(),
            waited,
            guard: Some(guard),
        }
    }

    /// How many keys have a flight in progress.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self
            .flights
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(guard) = self.guard.take() {
            // The map's handle and this guard's: nobody else waits, the flight is over.
            if Arc::strong_count(OwnedMutexGuard::mutex(&guard)) <= 2 {
                flights.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_readers_of_one_key_take_turns_and_the_map_empties() {
        let flights = Arc::new(Flights::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let cached = Arc::new(Mutex::new(false));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (flights, reads, cached) = (flights.clone(), reads.clone(), cached.clone());
            tasks.push(tokio::spawn(async move {
                let flight = flights.join("p1").await;
                // What get_profile does: a reader that waited finds the first one's fill.
                if flight.waited && *cached.lock().unwrap() {
                    return;
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                *cached.lock().unwrap() = true;
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "one database read for 20 misses"
        );
        assert_eq!(flights.len(), 0);
        // Other keys fly on their own.
        let a = flights.join("a").await;
        let b = flights.join("b").await;
        assert!(!a.waited && !b.waited);
        drop((a, b));
        assert_eq!(flights.len(), 0);
    }
}
