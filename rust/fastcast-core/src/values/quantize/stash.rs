//! The scales a weight's chunks found, kept for its scale tensor.
//!
//! `--quantize` writes a weight's e4m3 values and its scales as two tensors.
//! Each chunk of the values finds the scales of its block-rows anyway (they
//! divide the values); the scale tensor's chunks, which run right after,
//! take them from here instead of reading the whole weight again for its
//! amax (a third of the CPU of a quantization). A scale chunk that runs
//! before the weight's chunks it needs (the workers share chunks out in any
//! order) finds them missing and computes them itself: the same numbers, from
//! the same bytes, by the same code.

use std::sync::Mutex;

/// A weight's scale grid, filled block-row by block-row as its chunks run,
/// emptied as its scale tensor takes them.
pub struct Stash {
    grid_cols: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The grid, allocated by the first chunk that puts into it (a few KB
    /// to a few hundred: one f32 per block), freed when all of it is taken.
    scales: Vec<f32>,
    /// Per block-row: whether its scales are in `scales`.
    ready: Vec<bool>,
    /// Block-rows put and not taken yet.
    held: usize,
}

impl Stash {
    /// An empty stash for a grid of `[rows, cols]` scales.
    pub fn new(grid: [u64; 2]) -> Stash {
        Stash {
            grid_cols: grid[1] as usize,
            inner: Mutex::new(Inner {
                scales: Vec::new(),
                ready: vec![false; grid[0] as usize],
                held: 0,
            }),
        }
    }

    /// Keep `scales`, the scales of block-rows `first..` (`grid_cols` each).
    pub fn put(&self, first: usize, scales: &[f32]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rows = scales.len() / self.grid_cols.max(1);
        if first + rows > inner.ready.len() {
            return; // not this grid's block-rows: nothing to keep
        }
        if inner.scales.is_empty() {
            inner.scales = vec![0f32; inner.ready.len() * self.grid_cols];
        }
        let at = first * self.grid_cols;
        inner.scales[at..at + scales.len()].copy_from_slice(scales);
        let inner = &mut *inner;
        for ready in &mut inner.ready[first..first + rows] {
            if !*ready {
                *ready = true;
                inner.held += 1;
            }
        }
    }

    /// Fill `out` with the scales of block-rows `first..` if all of them are
    /// here (true), taking them; else leave `out` and the stash as they are.
    pub fn take(&self, first: usize, out: &mut [f32]) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rows = out.len() / self.grid_cols.max(1);
        let Some(ready) = inner.ready.get(first..first + rows) else {
            return false;
        };
        if rows == 0 || !ready.iter().all(|&r| r) {
            return false;
        }
        let at = first * self.grid_cols;
        out.copy_from_slice(&inner.scales[at..at + out.len()]);
        inner.ready[first..first + rows].fill(false);
        inner.held -= rows;
        if inner.held == 0 {
            inner.scales = Vec::new();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_was_put_once_and_nothing_missing() {
        let stash = Stash::new([4, 2]);
        let mut out = [0f32; 4];
        assert!(!stash.take(0, &mut out), "nothing put yet");
        stash.put(1, &[1.0, 2.0, 3.0, 4.0]); // block-rows 1 and 2
        assert!(!stash.take(0, &mut out), "block-row 0 is missing");
        assert_eq!(out, [0.0; 4], "a failed take leaves out alone");
        assert!(stash.take(1, &mut out));
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
        assert!(!stash.take(1, &mut out), "taken once");
        let mut two = [0f32; 2];
        stash.put(3, &[5.0, 6.0]);
        assert!(stash.take(3, &mut two));
        assert_eq!(two, [5.0, 6.0]);
        assert!(
            stash.inner.lock().unwrap().scales.is_empty(),
            "freed when all is taken"
        );
    }

    #[test]
    fn rows_outside_the_grid_are_neither_kept_nor_given() {
        let stash = Stash::new([2, 2]);
        stash.put(1, &[1.0, 2.0, 3.0, 4.0]); // block-rows 1 and 2: 2 is past the end
        let mut out = [0f32; 2];
        assert!(!stash.take(1, &mut out));
        assert!(!stash.take(5, &mut out));
        assert!(!stash.take(0, &mut []), "an empty take is no take");
    }
}
