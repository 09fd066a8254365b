//! Test fixture: a comparator whose `compare` allocates without bound (the host's memory limit
//! must stop it).

wit_bindgen::generate!({ world: "comparator", path: "../../../wit" });

struct Hog;

impl Guest for Hog {
    fn configure(_options: String) -> Result<(), String> {
        Ok(())
    }

    fn compare(_c: Comparison) -> Result<Vec<Metric>, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page so the memory is really used.
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(Hog);
