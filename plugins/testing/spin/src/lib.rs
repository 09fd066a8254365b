//! Test fixture: a comparator whose `compare` never returns (the host's epoch deadline must
//! interrupt it).

wit_bindgen::generate!({ world: "comparator", path: "../../../wit" });

struct Spin;

impl Guest for Spin {
    fn configure(_options: String) -> Result<(), String> {
        Ok(())
    }

    fn compare(c: Comparison) -> Result<Vec<Metric>, String> {
        let mut n: u64 = c.positions.len() as u64;
        loop {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export!(Spin);
