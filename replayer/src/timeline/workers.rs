//! Searches on every core: a search's independent pieces (checkpoint intervals) handed to workers, each
//! a replay of its own (its own KVM machine, on its own thread, opened from a [`Recipe`]), and the
//! answers taken back in the order of the pieces, so the result is the one a single replay would give.

use super::{Recipe, Timeline};
use crate::ReplayError;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How often the main thread asks whether the user interrupted the search.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Carries out `work` on each of `items` with `workers` replays at once, and returns the results of
/// the items in order: all of them, or up to the first for which `done` says the search is over, or
/// those before the first not finished when `interrupted` said to stop (then with `true`). An error
/// ends the search at the first item, in order, that failed. `work` gets a callback that says whether
/// to give up its item (the search is over or interrupted).
pub(crate) fn in_order<I, R, E, W>(
    recipe: &Recipe,
    workers: usize,
    items: &[I],
    interrupted: &mut dyn FnMut() -> bool,
    mut done: impl FnMut(&R) -> bool,
    work: W,
) -> Result<(Vec<R>, bool), E>
where
    I: Copy + Sync,
    R: Send,
    E: From<ReplayError> + Send,
    W: Fn(&mut Timeline, I, &dyn Fn() -> bool) -> Result<R, E> + Sync,
{
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let n = items.len();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..workers.min(n) {
            let (tx, next, stop, work) = (tx.clone(), &next, &stop, &work);
            scope.spawn(move || {
                let mut t = match recipe.open() {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send((None, Err(E::from(e))));
                        return;
                    }
                };
                let give_up = || stop.load(Ordering::SeqCst);
                while !give_up() {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&item) = items.get(i) else {
                        return;
                    };
                    if tx.send((Some(i), work(&mut t, item, &give_up))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let over = |result| {
            stop.store(true, Ordering::SeqCst);
            result
        };
        let mut results: Vec<Option<Result<R, E>>> = (0..n).map(|_| None).collect();
        let mut in_order = Vec::new();
        loop {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok((Some(i), result)) => results[i] = Some(result),
                // A worker that could not open its replay: the search cannot be done as asked.
                Ok((None, Err(e))) => return over(Err(e)),
                Ok((None, Ok(_))) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if interrupted() {
                        return over(Ok((in_order, true)));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return over(Ok((in_order, false))),
            }
            while let Some(result) = results.get_mut(in_order.len()).and_then(Option::take) {
                let result = match result {
                    Ok(r) => r,
                    Err(e) => return over(Err(e)),
                };
                let finished = done(&result);
                in_order.push(result);
                if finished || in_order.len() == n {
                    return over(Ok((in_order, false)));
                }
            }
        }
    })
}
