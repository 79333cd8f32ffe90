//! A plain union-find: the reference the identity graph is checked against. Identifiers seen
//! together in any record end up in one set, whatever the order of the records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

/// Disjoint sets of items, joined by [`UnionFind::union_all`].
#[derive(Debug, Clone)]
pub struct UnionFind<T> {
    index: HashMap<T, usize>,
    items: Vec<T>,
    parent: Vec<usize>,
}

impl<T> Default for UnionFind<T> {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            items: Vec::new(),
            parent: Vec::new(),
        }
    }
}

impl<T: Clone + Eq + Hash + Ord> UnionFind<T> {
    /// No sets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `item` as a set of its own, unless it is known; returns its index.
    fn add(&mut self, item: T) -> usize {
        if let Some(i) = self.index.get(&item) {
            return *i;
        }
        let i = self.items.len();
        self.index.insert(item.clone(), i);
        self.items.push(item);
        self.parent.push(i);
        i
    }

    fn root(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    /// Puts all of `items` (adding the unknown ones) into one set.
    pub fn union_all(&mut self, items: impl IntoIterator<Item = T>) {
        let mut first = None;
        for item in items {
            let i = self.add(item);
            let root = self.root(i);
            match first {
                None => first = Some(root),
                Some(f) => {
                    // The smaller index becomes the root, so roots do not depend on hashing.
                    let (keep, other) = if f < root { (f, root) } else { (root, f) };
                    self.parent[other] = keep;
                    first = Some(keep);
                }
            }
        }
    }

    /// Whether `a` and `b` are known and in the same set.
    pub fn same_set(&mut self, a: &T, b: &T) -> bool {
        match (self.root_of(a), self.root_of(b)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// The index of the root of `item`'s set, when `item` is known: two known items are in
    /// one set exactly when their roots are the same (until the next union).
    pub fn root_of(&mut self, item: &T) -> Option<usize> {
        let i = self.index.get(item).copied()?;
        Some(self.root(i))
    }

    /// The sets, each as a sorted set, in a canonical order.
    pub fn partition(&mut self) -> BTreeSet<BTreeSet<T>> {
        let mut sets: BTreeMap<usize, BTreeSet<T>> = BTreeMap::new();
        for i in 0..self.items.len() {
            let root = self.root(i);
            sets.entry(root).or_default().insert(self.items[i].clone());
        }
        sets.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_join_transitively() {
        let mut uf = UnionFind::new();
        uf.union_all([1, 2]);
        uf.union_all([3, 4]);
        uf.union_all([5]);
        assert!(!uf.same_set(&1, &3));
        assert_ne!(uf.root_of(&1), uf.root_of(&3));
        uf.union_all([2, 3]);
        assert!(uf.same_set(&1, &4));
        assert_eq!(uf.root_of(&1), uf.root_of(&4));
        assert_eq!(uf.root_of(&6), None);
        let expected: BTreeSet<BTreeSet<i32>> =
            [BTreeSet::from([1, 2, 3, 4]), BTreeSet::from([5])].into();
        assert_eq!(uf.partition(), expected);
    }
}
