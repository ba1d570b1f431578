//! Text out of tokens.
//!
//! [`TextStream`] turns generated token ids into text incrementally and emits only complete UTF-8
//! pieces (the idea of candle's TokenOutputStream and TGI's prefix/read offsets): a token that
//! ends inside a multi-byte character yields nothing, and the character arrives with the token
//! that completes it. [`StopMatcher`] finds stop strings across token boundaries and holds back
//! any text that might be the start of one, so a matched stop string is never emitted.

use tokenizers::Tokenizer;

/// Incremental detokenizer for one sequence.
pub struct TextStream {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, tokenizers::Error> {
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.tokens[self.prefix_offset..], true)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            if let Some(piece) = text.strip_prefix(prefix.as_str()) {
                let piece = piece.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
                return Ok(piece);
            }
        }
        Ok(String::new())
    }

    /// The text of every token not emitted yet (at the end of a sequence; may hold U+FFFD where
    /// the model stopped inside a character).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, tokenizers::Error> {
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.tokens[self.prefix_offset..], true)?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(text
            .strip_prefix(prefix.as_str())
            .map(str::to_owned)
            .unwrap_or_default())
    }
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty: some text is held back as a possible stop prefix).
    Continue(String),
    /// A stop string matched: emit this text (everything before the match) and stop.
    Stop { text: String, stop: String },
}

/// Finds stop strings in generated text, across token boundaries.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        self.pending.push_str(text);
        // The earliest match wins (ties: the longest stop string).
        let found = self
            .stops
            .iter()
            .filter_map(|s| {
                self.pending
                    .find(s.as_str())
                    .map(|at| (at, std::cmp::Reverse(s.len()), s))
            })
            .min();
        if let Some((at, _, stop)) = found {
            let text = self.pending[..at].to_owned();
            let stop = stop.clone();
            self.pending.clear();
            return StopOutcome::Stop { text, stop };
        }
        // Hold back the longest suffix that could start a stop string.
        let hold = self.longest_stop_prefix_suffix();
        let emit_len = self.pending.len() - hold;
        let emitted: String = self.pending[..emit_len].to_owned();
        self.pending.drain(..emit_len);
        StopOutcome::Continue(emitted)
    }

    /// Text held back at the end of generation (no stop string matched).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.pending.char_indices() {
            let suffix = &self.pending[start..];
            if suffix.len() <= best {
                break;
            }
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                best = suffix.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_match_across_pushes_and_are_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(
            m.push("D tail"),
            StopOutcome::Stop {
                text: String::new(),
                stop: "END".into()
            }
        );
    }

    #[test]
    fn held_back_text_is_released_when_it_stops_looking_like_a_stop() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "User:".into()]);
        assert_eq!(m.push("a\n"), StopOutcome::Continue("a".into()));
        assert_eq!(m.push("b"), StopOutcome::Continue("\nb".into()));
        assert_eq!(m.push(" Us"), StopOutcome::Continue(" ".into()));
        assert_eq!(m.flush(), "Us");
    }

    #[test]
    fn earliest_match_wins() {
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(
            m.push("abcd"),
            StopOutcome::Stop {
                text: "a".into(),
                stop: "b".into()
            }
        );
    }

    #[test]
    fn no_stops_pass_text_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("x"), StopOutcome::Continue("x".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn multibyte_stops_hold_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["日本".into()]);
        assert_eq!(m.push("é日"), StopOutcome::Continue("é".into()));
        assert_eq!(
            m.push("本"),
            StopOutcome::Stop {
                text: String::new(),
                stop: "日本".into()
            }
        );
    }
}
