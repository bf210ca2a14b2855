//! The value each active actor writes: its append-only write log, compressed into runs.
//!
//! One line per activation that wrote, `TOKEN HOLDER FIRST LAST`: the activation's fencing
//! token, its holder (`node@incarnation`) and the first and last sequence number it wrote.
//! An activation starts from the value its fence read (what the previous holders left) and
//! extends its own run with every write. So the value at the end names every write that was
//! ever acknowledged, in token order, unless a stale write overwrote a later holder's: the
//! node fault test reads the file back and checks exactly that.

use kelpie_core::FencingToken;

/// Most runs kept in one actor's value; the oldest are dropped beyond it (the fault test
/// makes far fewer activations than this).
pub const RUNS_MAX: usize = 4_096;

/// One activation's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub token: FencingToken,
    pub holder: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// An actor's write log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs {
    runs: Vec<Run>,
}

impl Runs {
    /// Parses a value written by [`encode`](Self::encode); `None` for an empty state.
    ///
    /// # Errors
    /// A description of the first line that is not a run.
    pub fn parse(value: Option<&[u8]>) -> Result<Self, String> {
        let Some(value) = value else {
            return Ok(Self::default());
        };
        let text = std::str::from_utf8(value).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut runs = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split(' ').collect();
            let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            match (number(0), words.get(1), number(2), number(3), words.len()) {
                (Some(token), Some(holder), Some(first_seq), Some(last_seq), 4) => runs.push(Run {
                    token: FencingToken(token),
                    holder: (*holder).to_string(),
                    first_seq,
                    last_seq,
                }),
                _ => return Err(format!("not a run: {line:?}")),
            }
        }
        Ok(Self { runs })
    }

    /// The last run that wrote anything: in the value a fence read, the previous holders'
    /// last write (its token and sequence number), which places every earlier write before
    /// that fence in the store's order.
    pub fn last_written(&self) -> Option<&Run> {
        self.runs.iter().rev().find(|run| run.first_seq > 0)
    }

    /// Starts the run of a new activation.
    pub fn begin(&mut self, token: FencingToken, holder: &str) {
        if self.runs.len() >= RUNS_MAX {
            self.runs.remove(0);
        }
        self.runs.push(Run {
            token,
            holder: holder.to_string(),
            first_seq: 0,
            last_seq: 0,
        });
    }

    /// Sets the current run's last sequence number (the first, on its first write).
    pub fn extend(&mut self, seq: u64) {
        let run = self.runs.last_mut().expect("begin comes before extend");
        if run.first_seq == 0 {
            run.first_seq = seq;
        }
        run.last_seq = seq;
    }

    /// The value to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut text = String::new();
        for run in self.runs.iter().filter(|r| r.first_seq > 0) {
            text.push_str(&format!(
                "{} {} {} {}\n",
                run.token.0, run.holder, run.first_seq, run.last_seq
            ));
        }
        text.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_and_skip_activations_that_never_wrote() {
        let mut runs = Runs::parse(None).unwrap();
        runs.begin(FencingToken(3), "node-a@1");
        runs.extend(1);
        runs.extend(2);
        runs.begin(FencingToken(5), "node-b@2");
        let value = runs.encode();
        assert_eq!(value, b"3 node-a@1 1 2\n");
        let mut back = Runs::parse(Some(&value)).unwrap();
        let last = back.last_written().unwrap();
        assert_eq!((last.token, last.last_seq), (FencingToken(3), 2));
        back.begin(FencingToken(7), "node-a@3");
        back.extend(1);
        assert_eq!(back.encode(), b"3 node-a@1 1 2\n7 node-a@3 1 1\n");
        assert_eq!(back.last_written().unwrap().token, FencingToken(7));
        assert!(Runs::parse(None).unwrap().last_written().is_none());
        assert!(Runs::parse(Some(b"3 node-a 1")).is_err());
        assert!(Runs::parse(Some(b"x node-a 1 2")).is_err());
    }
}
