//! Traffic classes for communicators made through the C library, without touching the
//! caller's code: `OXCCL_NCCL_CLASS` holds rules, the first that matches wins, else the
//! process's `OXCCL_CLASS` (default `bulk`).
//!
//! ```text
//! OXCCL_NCCL_CLASS="name:refit*=weight_refit, size:9=weight_refit"
//! ```
//!
//! A rule is `SELECTOR=CLASS`: `name:GLOB` matches `ncclConfig_t.commName` (`*` is any run
//! of characters), `size:N` a communicator of N ranks. A bare `CLASS` matches every
//! communicator (a default for this library only).

use oxccl::Config;

use crate::types::Fail;

/// What a communicator looks like to the rules.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// `commName` from its configuration.
    pub name: Option<&'a str>,
    /// Its number of ranks.
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Name(String),
    Size(usize),
    Any,
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    when: Selector,
    class: String,
}

fn parse(spec: &str) -> Result<Vec<Rule>, Fail> {
    let bad = |r: &str, why: &str| Fail::arg(format!("OXCCL_NCCL_CLASS: rule {r:?} {why} (docs/nccl-abi.md)"));
    let mut out = Vec::new();
    for r in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (when, class) = match r.rsplit_once('=') {
            None => (Selector::Any, r),
            Some((sel, class)) => {
                let when = if let Some(g) = sel.trim().strip_prefix("name:") {
                    Selector::Name(g.to_string())
                } else if let Some(n) = sel.trim().strip_prefix("size:") {
                    Selector::Size(n.trim().parse().map_err(|_| bad(r, "has a size that is not a number"))?)
                } else {
                    return Err(bad(r, "selects by neither name: nor size:"));
                };
                (when, class)
            }
        };
        // The class name is checked by the configuration itself.
        let mut probe = Config::defaults();
        probe.set("OXCCL_CLASS", class.trim()).map_err(|e| bad(r, &format!("names no traffic class: {e}")))?;
        out.push(Rule { when, class: class.trim().to_string() });
    }
    Ok(out)
}

fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else { return false };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// The class the rules in `spec` give a communicator (`None`: no rule matches).
fn pick(spec: &str, f: Facts<'_>) -> Result<Option<String>, Fail> {
    Ok(parse(spec)?
        .into_iter()
        .find(|r| match &r.when {
            Selector::Name(g) => f.name.is_some_and(|n| glob(g, n)),
            Selector::Size(n) => *n == f.size,
            Selector::Any => true,
        })
        .map(|r| r.class))
}

/// `cfg` with the class `OXCCL_NCCL_CLASS` gives a communicator with `facts` (unchanged
/// when no rule matches or the variable is unset).
pub fn apply(cfg: &mut Config, facts: Facts<'_>) -> Result<(), Fail> {
    let Ok(spec) = std::env::var("OXCCL_NCCL_CLASS") else { return Ok(()) };
    if let Some(class) = pick(&spec, facts)? {
        cfg.set("OXCCL_CLASS", &class)?;
        tracing::info!(class, name = facts.name, size = facts.size, "OXCCL_NCCL_CLASS picked the traffic class");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_by_name_size_or_anything_first_wins() {
        let spec = "name:refit*=weight_refit, size:2=pipeline_stage, bulk";
        let f = |name, size| pick(spec, Facts { name, size }).unwrap();
        assert_eq!(f(Some("refit-0"), 9).as_deref(), Some("weight_refit"));
        assert_eq!(f(Some("grad"), 2).as_deref(), Some("pipeline_stage"));
        assert_eq!(f(None, 8).as_deref(), Some("bulk"));
        assert_eq!(pick("size:9=weight_refit", Facts { name: None, size: 8 }).unwrap(), None);
        assert!(glob("*refit", "nemo-refit") && glob("a*b*c", "aXbYc") && !glob("a*b", "ac"));
    }

    #[test]
    fn bad_rules_are_clear_errors() {
        for (spec, want) in [
            ("size:x=gradient", "not a number"),
            ("rank:0=gradient", "neither name: nor size:"),
            ("name:a=urgent", "names no traffic class"),
        ] {
            let e = pick(spec, Facts { name: Some("a"), size: 2 }).unwrap_err();
            assert!(e.msg.contains(want) && e.msg.contains("OXCCL_NCCL_CLASS"), "{spec}: {}", e.msg);
        }
    }
}
