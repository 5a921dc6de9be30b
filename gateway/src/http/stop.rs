//! Stop strings over streamed text: the output is cut before the first stop string, which may
//! span any number of tokens.
//!
//! Text arrives in pieces; a piece that ends with what could be the start of a stop string is
//! held back until the next piece decides it (the stop string completes: everything from it on
//! is dropped; it does not: the held text is released). So a client never receives text that
//! a later token turns into part of a stop string.

/// Incremental stop-string matcher.
#[derive(Clone, Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// vLLM's `include_stop_str_in_output`: keep the stop string itself.
    include: bool,
    /// Text received but not yet released.
    held: String,
}

/// What one piece of text released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Released {
    pub text: String,
    /// The stop string that matched; nothing more may be released after it.
    pub stopped: Option<String>,
}

impl StopMatcher {
    /// Empty strings are ignored (they would match before any text).
    pub(crate) fn new(stops: Vec<String>, include: bool) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include,
            held: String::new(),
        }
    }

    /// Adds `text` and returns what may be sent now.
    pub(crate) fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: text.to_string(),
                stopped: None,
            };
        }
        self.held.push_str(text);
        // The earliest match wins; at the same position, the longest stop string (so "a" and
        // "ab" at one place report the one that is there in full either way).
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let end = if self.include { at + stop.len() } else { at };
            let text = self.held[..end].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: Some(stop),
            };
        }
        let keep = self.partial_suffix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: None,
        }
    }

    /// The generation ended: whatever was held back is ordinary text after all.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of `held` that are a proper prefix of some stop string (and so may
    /// still become one). Only char boundaries are considered, so the split is valid UTF-8.
    fn partial_suffix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            // Longest first: the first suffix that fits is the one to hold.
            let max = (stop.len() - 1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, Option<String>, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), false);
        let mut out = Vec::new();
        for p in pieces {
            let r = m.push(p);
            out.push(r.text);
            if r.stopped.is_some() {
                return (out, r.stopped, String::new());
            }
        }
        let rest = m.finish();
        (out, None, rest)
    }

    #[test]
    fn cuts_before_a_stop_string_inside_one_piece() {
        let (out, stop, _) = run(&["END"], &["hello END world"]);
        assert_eq!(out, ["hello "]);
        assert_eq!(stop.as_deref(), Some("END"));
    }

    #[test]
    fn holds_text_that_may_start_a_stop_string_across_pieces() {
        let (out, stop, _) = run(&["\n\nUser:"], &["Hi", " there\n", "\nUs", "er:", " more"]);
        assert_eq!(out, ["Hi", " there", "", ""]);
        assert_eq!(stop.as_deref(), Some("\n\nUser:"));
    }

    #[test]
    fn releases_held_text_when_the_match_fails() {
        let (out, stop, rest) = run(&["STOP"], &["a ST", "ART b", " ST"]);
        assert_eq!(out, ["a ", "START b", " "]);
        assert_eq!(stop, None);
        assert_eq!(rest, "ST");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, stop, _) = run(&["world", "lo w"], &["hel", "lo world"]);
        assert_eq!(out.concat(), "hel");
        assert_eq!(stop.as_deref(), Some("lo w"));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let (out, stop, rest) = run(&["éx"], &["aé", "é", "y"]);
        assert_eq!(out, ["a", "é", "éy"]);
        assert_eq!((stop, rest), (None, String::new()));
        let (out, stop, _) = run(&["日本"], &["今日", "本"]);
        assert_eq!(out, ["今", ""]);
        assert_eq!(stop.as_deref(), Some("日本"));
    }

    #[test]
    fn any_split_gives_the_same_text() {
        let text = "one ENDURE two EN END three";
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let (out, stop, rest) =
                    run(&["END ", "NDU"], &[&text[..a], &text[a..b], &text[b..]]);
                assert_eq!(out.concat() + &rest, "one E", "cuts {a} {b}");
                assert_eq!(stop.as_deref(), Some("NDU"));
            }
        }
    }

    #[test]
    fn the_stop_string_can_be_kept() {
        let mut m = StopMatcher::new(vec!["END".into()], true);
        assert_eq!(m.push("a E").text, "a ");
        let r = m.push("ND b");
        assert_eq!(
            (r.text.as_str(), r.stopped.as_deref()),
            ("END", Some("END"))
        );
    }

    #[test]
    fn no_stop_strings_pass_through() {
        let (out, stop, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b"]);
        assert_eq!((stop, rest), (None, String::new()));
    }
}
