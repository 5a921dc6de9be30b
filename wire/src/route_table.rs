//! [`Routes`]: which experts each row of a batch goes to, with what weight, in the order its
//! outputs are summed. The router makes it on the attention side, kernels consume it, and
//! [`crate::routes`] puts it on the wire.

/// Routing decisions for a batch in compressed-row form: row `i` sends its hidden vector to
/// the experts `experts[offsets[i]..offsets[i+1]]` with the matching weights, and its routed
/// output is the weighted sum of those experts' outputs taken in exactly that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routes {
    offsets: Vec<usize>,
    experts: Vec<u32>,
    weights: Vec<f32>,
}

impl Routes {
    pub fn new() -> Self {
        Routes {
            offsets: vec![0],
            experts: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn with_capacity(rows: usize, pairs: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Routes {
            offsets,
            experts: Vec::with_capacity(pairs),
            weights: Vec::with_capacity(pairs),
        }
    }

    /// Appends one row's (expert, weight) pairs.
    pub fn push_row(&mut self, experts: &[u32], weights: &[f32]) {
        assert_eq!(experts.len(), weights.len(), "one weight per expert");
        self.experts.extend_from_slice(experts);
        self.weights.extend_from_slice(weights);
        self.offsets.push(self.experts.len());
    }

    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total (row, expert) pairs.
    pub fn pairs(&self) -> usize {
        self.experts.len()
    }

    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (&self.experts[a..b], &self.weights[a..b])
    }

    /// Range of pair indices that belong to row `i`.
    pub fn row_range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    pub fn experts(&self) -> &[u32] {
        &self.experts
    }

    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
}
