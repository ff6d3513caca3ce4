//! Counting outcomes and summarising latencies.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx with the expected body.
    Ok,
    /// The connection was refused (`ECONNREFUSED`).
    Refused,
    /// The connection was reset or closed under a written request (`ECONNRESET`, `EPIPE`,
    /// EOF before a complete response).
    Reset,
    /// No complete answer within the timeout.
    Timeout,
    /// A status other than 2xx.
    BadStatus,
    /// 2xx with a body that is not `pong <build-id> pid=<pid>`.
    WrongBody,
    /// Any other error (protocol errors, HTTP/2 stream errors), kept with its message.
    Other,
}

/// Outcome counts. Every request sent is counted exactly once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Requests answered correctly.
    pub ok: u64,
    /// Refused connections.
    pub refused: u64,
    /// Resets and premature closes.
    pub reset: u64,
    /// Timeouts.
    pub timed_out: u64,
    /// Non-2xx answers.
    pub bad_status: u64,
    /// Wrong bodies.
    pub wrong_body: u64,
    /// Other errors.
    pub other: u64,
}

impl Counts {
    /// Counts one outcome.
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Reset => self.reset += 1,
            Outcome::Timeout => self.timed_out += 1,
            Outcome::BadStatus => self.bad_status += 1,
            Outcome::WrongBody => self.wrong_body += 1,
            Outcome::Other => self.other += 1,
        }
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.refused += o.refused;
        self.reset += o.reset;
        self.timed_out += o.timed_out;
        self.bad_status += o.bad_status;
        self.wrong_body += o.wrong_body;
        self.other += o.other;
    }

    /// Every request that did not end `Ok`.
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.timed_out + self.bad_status + self.wrong_body + self.other
    }

    /// Every request.
    pub fn total(&self) -> u64 {
        self.ok + self.failed()
    }
}

/// Error messages by count, bounded in the number of distinct messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorSamples(pub BTreeMap<String, u64>);

impl ErrorSamples {
    const MAX: usize = 32;

    /// Counts a message.
    pub fn add(&mut self, msg: String) {
        if let Some(n) = self.0.get_mut(&msg) {
            *n += 1;
        } else if self.0.len() < Self::MAX {
            self.0.insert(msg, 1);
        } else {
            *self.0.entry("(other messages)".to_owned()).or_insert(0) += 1;
        }
    }

    /// Adds another set.
    pub fn merge(&mut self, o: &ErrorSamples) {
        for (k, v) in &o.0 {
            for _ in 0..*v {
                self.add(k.clone());
            }
        }
    }
}

/// A new latency histogram in microseconds (1 µs to 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail at run time.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl Latency {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Summary of a small set of durations (handoffs, drains).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// How many.
    pub count: usize,
    /// Smallest, ms.
    pub min_ms: f64,
    /// Median, ms.
    pub median_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

impl Spread {
    /// Summarises durations.
    pub fn of(durations: impl IntoIterator<Item = Duration>) -> Spread {
        let mut v: Vec<f64> = durations
            .into_iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Spread {
            count: v.len(),
            min_ms: v[0],
            median_ms: at(0.5),
            p90_ms: at(0.9),
            max_ms: v[v.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up() {
        let mut c = Counts::default();
        for o in [
            Outcome::Ok,
            Outcome::Ok,
            Outcome::Reset,
            Outcome::Refused,
            Outcome::WrongBody,
        ] {
            c.add(o);
        }
        assert_eq!((c.total(), c.failed()), (5, 3));
    }

    #[test]
    fn spread_summarises() {
        let s = Spread::of([3, 1, 2].map(Duration::from_millis));
        assert_eq!(
            (s.count, s.min_ms, s.median_ms, s.max_ms),
            (3, 1.0, 2.0, 3.0)
        );
        assert_eq!(Spread::of([]).count, 0);
    }
}
