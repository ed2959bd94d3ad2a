//! A temporary folder for this crate's tests, removed when dropped.

use std::path::PathBuf;

pub struct Dir(pub PathBuf);

impl Dir {
    /// A fresh, empty folder named after the test.
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("ztp-infra-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    /// Writes `text` to `name` in the folder.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
