//! What a rank worker tells the test that started it: one JSON object per stdout line, behind
//! [`PREFIX`]. Events on the way (`{"event":"ready"}`, `{"signal":"KILL","at_ns":..}`), and
//! last its outcome (`{"scenario":..,"rank":..,"checks":..}`). Other lines (logs, figures
//! for people) are ignored.

use serde_json::Value;

/// Start of a report line.
pub const PREFIX: &str = "oxccl-report ";

/// Prints `v` as a report line.
pub fn emit(v: Value) {
    println!("{PREFIX}{v}");
}

/// The report on one line, if it is one.
pub fn parse_line(line: &str) -> Option<Value> {
    serde_json::from_str(line.trim_end().strip_prefix(PREFIX)?).ok()
}

/// Every report in a rank's output, in order.
pub fn all(stdout: &str) -> Vec<Value> {
    stdout.lines().filter_map(parse_line).collect()
}

/// `key` of the first report that has it.
pub fn get(stdout: &str, key: &str) -> Option<Value> {
    all(stdout).into_iter().find_map(|v| v.get(key).cloned())
}

/// How a rank's scenario ended: its name, the rank, and how many checks passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The scenario.
    pub scenario: String,
    /// The rank.
    pub rank: u64,
    /// Checks passed.
    pub checks: u64,
}

/// The rank's outcome, if it got that far.
pub fn outcome(stdout: &str) -> Option<Outcome> {
    all(stdout).into_iter().rev().find_map(|v| {
        Some(Outcome {
            scenario: v.get("scenario")?.as_str()?.to_string(),
            rank: v.get("rank")?.as_u64()?,
            checks: v.get("checks")?.as_u64()?,
        })
    })
}

/// The outcome of rank `i` (which must have one, with at least one check), or a failure
/// that says what the rank printed instead.
pub fn passed(i: usize, stdout: &str) -> Outcome {
    let o = outcome(stdout).unwrap_or_else(|| panic!("rank {i} reported no outcome; it printed:\n{stdout}"));
    assert!(o.checks > 0, "rank {i} ran {} with no check passed:\n{stdout}", o.scenario);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_found_among_other_lines() {
        let out = format!(
            "log line\n{PREFIX}{{\"event\":\"ready\"}}\nrank 0 waited 1s\n{PREFIX}{{\"scenario\":\"x\",\"rank\":2,\"checks\":7}}\n"
        );
        assert_eq!(all(&out).len(), 2);
        assert_eq!(get(&out, "event").unwrap(), "ready");
        assert_eq!(outcome(&out).unwrap(), Outcome { scenario: "x".into(), rank: 2, checks: 7 });
        assert_eq!(passed(2, &out).checks, 7);
        assert!(outcome("nothing here").is_none());
        assert!(std::panic::catch_unwind(|| passed(0, "nothing here")).is_err());
    }
}
