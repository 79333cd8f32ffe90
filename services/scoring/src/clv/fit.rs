//! Maximum likelihood by L-BFGS (the `argmin` crate), on the *mean* negative log-likelihood in
//! log-parameter space.
//!
//! Why the mean: a tolerance on the summed likelihood scales with the number of customers, so on
//! a real population it never triggers (or triggers far too early on a small one). Why log space:
//! every parameter of these models is positive, and `θ = ln p` makes the problem unconstrained.

use std::cell::RefCell;

use argmin::core::{CostFunction, Executor, Gradient, State, TerminationReason};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;

use super::{ClvError, FitDiagnostics};

/// The optimizer stops when the gradient of the mean negative log-likelihood (per log-parameter)
/// is this small: parameters are then exact to about seven significant digits.
const TOLERANCE_GRAD: f64 = 1e-9;
/// ... or when one iteration improves the mean negative log-likelihood by less than this.
const TOLERANCE_COST: f64 = 1e-14;
/// The iteration budget; the models here converge in a few dozen.
const MAX_ITERATIONS: u64 = 1_000;
/// Restarts after a failed line search (see [`minimize`]).
const MAX_RESTARTS: usize = 5;
/// Gradient pairs L-BFGS keeps.
const LBFGS_MEMORY: usize = 7;

/// A mean negative log-likelihood with its gradient, both in log-parameter space.
pub(crate) trait Objective {
    /// `(cost, gradient)` at `theta`; the cost is not finite where the model is not defined.
    fn evaluate(&self, theta: &[f64]) -> (f64, Vec<f64>);
}

/// Where the optimizer stopped.
#[derive(Debug, Clone)]
pub(crate) struct Minimum {
    pub(crate) theta: Vec<f64>,
    pub(crate) iterations: u64,
    pub(crate) converged: bool,
    pub(crate) stop_reason: String,
    pub(crate) gradient_norm: f64,
}

/// Minimizes `objective` from `start` with L-BFGS and a More-Thuente line search.
///
/// Near the optimum the gradient is tiny and rounding can make an L-BFGS direction point uphill,
/// which stops the line search. Such a run is restarted from its best point with a fresh memory
/// (its first direction is the steepest descent), as long as restarts still lower the cost.
pub(crate) fn minimize<O: Objective>(objective: &O, start: Vec<f64>) -> Result<Minimum, ClvError> {
    let mut theta = start;
    let mut iterations = 0;
    let mut best_cost = f64::INFINITY;
    for _ in 0..=MAX_RESTARTS {
        let run = run_lbfgs(objective, theta.clone())?;
        iterations += run.iterations;
        let improved = run.cost < best_cost;
        if improved {
            theta = run.theta;
            best_cost = run.cost;
        }
        if run.converged || !improved {
            let gradient_norm = l2_norm(&objective.evaluate(&theta).1);
            return Ok(Minimum {
                theta,
                iterations,
                converged: run.converged || gradient_norm <= TOLERANCE_GRAD,
                stop_reason: run.stop_reason,
                gradient_norm,
            });
        }
    }
    let gradient_norm = l2_norm(&objective.evaluate(&theta).1);
    Ok(Minimum {
        theta,
        iterations,
        converged: gradient_norm <= TOLERANCE_GRAD,
        stop_reason: format!("{MAX_RESTARTS} restarts"),
        gradient_norm,
    })
}

struct Run {
    theta: Vec<f64>,
    cost: f64,
    iterations: u64,
    converged: bool,
    stop_reason: String,
}

fn run_lbfgs<O: Objective>(objective: &O, start: Vec<f64>) -> Result<Run, ClvError> {
    let problem = Problem {
        objective,
        last: RefCell::new(None),
    };
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), LBFGS_MEMORY)
        .with_tolerance_grad(TOLERANCE_GRAD)
        .and_then(|s| s.with_tolerance_cost(TOLERANCE_COST))
        .map_err(|e| ClvError::Optimizer(e.to_string()))?;
    let result = Executor::new(problem, solver)
        .configure(|state| state.param(start).max_iters(MAX_ITERATIONS))
        .run()
        .map_err(|e| ClvError::Optimizer(e.to_string()))?;
    let state = result.state();
    let theta = state
        .get_best_param()
        .cloned()
        .ok_or_else(|| ClvError::Optimizer("no parameters were evaluated".to_owned()))?;
    let reason = state.get_termination_reason();
    Ok(Run {
        theta,
        cost: state.get_best_cost(),
        iterations: state.get_iter(),
        converged: reason == Some(&TerminationReason::SolverConverged),
        stop_reason: reason.map_or("not terminated", |r| r.text()).to_owned(),
    })
}

fn l2_norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Log-parameters, with the cost and gradient there.
type Evaluation = (Vec<f64>, f64, Vec<f64>);

/// Adapts an [`Objective`] to argmin. The line search asks for the cost and then the gradient at
/// the same point; both come from one pass over the customers, so the last one is kept.
struct Problem<'a, O> {
    objective: &'a O,
    last: RefCell<Option<Evaluation>>,
}

impl<O: Objective> Problem<'_, O> {
    fn evaluate(&self, theta: &[f64]) -> Result<(f64, Vec<f64>), argmin::core::Error> {
        if let Some((at, cost, grad)) = self.last.borrow().as_ref()
            && at.as_slice() == theta
        {
            return Ok((*cost, grad.clone()));
        }
        let (cost, grad) = self.objective.evaluate(theta);
        if !cost.is_finite() || grad.iter().any(|g| !g.is_finite()) {
            return Err(argmin::core::Error::msg(format!(
                "the log-likelihood is not finite at log-parameters {theta:?}"
            )));
        }
        *self.last.borrow_mut() = Some((theta.to_vec(), cost, grad.clone()));
        Ok((cost, grad))
    }
}

impl<O: Objective> CostFunction for Problem<'_, O> {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, theta: &Self::Param) -> Result<Self::Output, argmin::core::Error> {
        Ok(self.evaluate(theta)?.0)
    }
}

impl<O: Objective> Gradient for Problem<'_, O> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;

    fn gradient(&self, theta: &Self::Param) -> Result<Self::Gradient, argmin::core::Error> {
        Ok(self.evaluate(theta)?.1)
    }
}

impl FitDiagnostics {
    /// Diagnostics of a fit over `customers` that ended at `minimum` with this summed
    /// log-likelihood (on the caller's own time and money units).
    pub(crate) fn new(minimum: &Minimum, log_likelihood: f64, customers: usize) -> Self {
        Self {
            log_likelihood,
            mean_log_likelihood: log_likelihood / customers as f64,
            iterations: minimum.iterations,
            converged: minimum.converged,
            stop_reason: minimum.stop_reason.clone(),
            gradient_norm: minimum.gradient_norm,
            customers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rosenbrock function, a classic hard valley, minimum 0 at (1, 1).
    struct Rosenbrock;

    impl Objective for Rosenbrock {
        fn evaluate(&self, t: &[f64]) -> (f64, Vec<f64>) {
            let (x, y) = (t[0], t[1]);
            let cost = (1.0 - x).powi(2) + 100.0 * (y - x * x).powi(2);
            let grad = vec![
                -2.0 * (1.0 - x) - 400.0 * x * (y - x * x),
                200.0 * (y - x * x),
            ];
            (cost, grad)
        }
    }

    #[test]
    fn finds_the_rosenbrock_minimum() {
        let m = minimize(&Rosenbrock, vec![-1.2, 1.0]).unwrap();
        assert!(m.converged);
        assert!(
            (m.theta[0] - 1.0).abs() < 1e-6 && (m.theta[1] - 1.0).abs() < 1e-6,
            "{m:?}"
        );
    }

    struct NotFinite;

    impl Objective for NotFinite {
        fn evaluate(&self, _: &[f64]) -> (f64, Vec<f64>) {
            (f64::NAN, vec![0.0])
        }
    }

    #[test]
    fn a_non_finite_likelihood_is_an_error() {
        assert!(matches!(
            minimize(&NotFinite, vec![0.0]),
            Err(ClvError::Optimizer(_))
        ));
    }
}
