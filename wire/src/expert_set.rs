//! Which routed experts a node holds: `all`, or ranges and single ids such as `0-127,300`.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ExpertSetError {
    #[error("expert set {spec:?}: {part:?} is not an id or a range like 0-127")]
    Syntax { spec: String, part: String },
    #[error("expert set {spec:?}: expert {id} does not exist (the model has {experts})")]
    OutOfRange {
        spec: String,
        id: usize,
        experts: usize,
    },
    #[error("expert set {spec:?}: range {part:?} is empty (start after end)")]
    EmptyRange { spec: String, part: String },
    #[error("expert set {spec:?} names no experts")]
    Empty { spec: String },
}

/// A set of expert ids of one model (the same ids in every layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSet {
    held: Vec<bool>,
}

impl ExpertSet {
    /// Every expert of a model with `experts` experts.
    pub fn all(experts: usize) -> Self {
        ExpertSet {
            held: vec![true; experts],
        }
    }

    /// No experts (a node that has not been given any yet).
    pub fn none(experts: usize) -> Self {
        ExpertSet {
            held: vec![false; experts],
        }
    }

    /// The set of `ids` (ids at or past `experts` are ignored).
    pub fn from_ids(ids: impl IntoIterator<Item = usize>, experts: usize) -> Self {
        let mut s = ExpertSet::none(experts);
        for e in ids {
            if let Some(h) = s.held.get_mut(e) {
                *h = true;
            }
        }
        s
    }

    /// Experts in either set (the universe of `self`).
    pub fn union(&self, other: &ExpertSet) -> Self {
        ExpertSet::from_ids(self.iter().chain(other.iter()), self.universe())
    }

    /// Experts in `self` and not in `other`.
    pub fn difference(&self, other: &ExpertSet) -> Self {
        ExpertSet::from_ids(self.iter().filter(|&e| !other.contains(e)), self.universe())
    }

    /// Adds expert `e` (ignored past the universe).
    pub fn insert(&mut self, e: usize) {
        if let Some(h) = self.held.get_mut(e) {
            *h = true;
        }
    }

    /// Removes expert `e`.
    pub fn remove(&mut self, e: usize) {
        if let Some(h) = self.held.get_mut(e) {
            *h = false;
        }
    }

    /// Parses `all` or a comma-separated list of ids and inclusive ranges.
    pub fn parse(spec: &str, experts: usize) -> Result<Self, ExpertSetError> {
        let spec_s = spec.trim();
        if spec_s == "all" {
            return Ok(ExpertSet::all(experts));
        }
        let mut held = vec![false; experts];
        let syntax = |part: &str| ExpertSetError::Syntax {
            spec: spec.into(),
            part: part.into(),
        };
        for part in spec_s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<usize>().map_err(|_| syntax(part))?,
                    b.trim().parse::<usize>().map_err(|_| syntax(part))?,
                ),
                None => {
                    let v = part.parse::<usize>().map_err(|_| syntax(part))?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(ExpertSetError::EmptyRange {
                    spec: spec.into(),
                    part: part.into(),
                });
            }
            if hi >= experts {
                return Err(ExpertSetError::OutOfRange {
                    spec: spec.into(),
                    id: hi,
                    experts,
                });
            }
            held[lo..=hi].iter_mut().for_each(|h| *h = true);
        }
        if !held.iter().any(|h| *h) {
            return Err(ExpertSetError::Empty { spec: spec.into() });
        }
        Ok(ExpertSet { held })
    }

    pub fn contains(&self, e: usize) -> bool {
        self.held.get(e).copied().unwrap_or(false)
    }

    pub fn len(&self) -> usize {
        self.held.iter().filter(|h| **h).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Experts of the model (held or not).
    pub fn universe(&self) -> usize {
        self.held.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.held
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(e, _)| e)
    }
}

impl std::fmt::Display for ExpertSet {
    /// Compact ranges, e.g. `0-127,300`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<usize> = self.iter().collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            parts.push(if i == j {
                ids[i].to_string()
            } else {
                format!("{}-{}", ids[i], ids[j])
            });
            i = j + 1;
        }
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_ids_and_prints_them_back() {
        let s = ExpertSet::parse("0-3, 7,5-5", 10).expect("valid");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 5, 7]);
        assert_eq!(s.to_string(), "0-3,5,7");
        assert_eq!(ExpertSet::parse("all", 4).expect("valid").len(), 4);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(matches!(
            ExpertSet::parse("0-x", 8),
            Err(ExpertSetError::Syntax { .. })
        ));
        assert!(matches!(
            ExpertSet::parse("3-1", 8),
            Err(ExpertSetError::EmptyRange { .. })
        ));
        let e = ExpertSet::parse("0-8", 8).expect_err("out of range");
        assert!(e.to_string().contains("expert 8 does not exist"));
        assert!(matches!(
            ExpertSet::parse(" , ", 8),
            Err(ExpertSetError::Empty { .. })
        ));
    }
}
