//! Test fixture: a comparator whose `compare` panics (a trap in the host) on every record whose
//! id starts with `trap`, and otherwise returns `calls`, the number of compare calls this
//! instance has seen (so a test can tell a fresh instance from a reused one).

use std::sync::atomic::{AtomicU32, Ordering};

wit_bindgen::generate!({ world: "comparator", path: "../../../wit" });

use kl_proxy::comparator::types::Value;

static CALLS: AtomicU32 = AtomicU32::new(0);

struct Trap;

impl Guest for Trap {
    fn configure(_options: String) -> Result<(), String> {
        Ok(())
    }

    fn compare(c: Comparison) -> Result<Vec<Metric>, String> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        if c.id.starts_with("trap") {
            panic!("trap fixture: compare called on {}", c.id);
        }
        Ok(vec![Metric {
            name: "calls".into(),
            help: "Compare calls this instance has seen".into(),
            value: Value::Scalar(f64::from(calls)),
        }])
    }
}

export!(Trap);
