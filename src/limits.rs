//! Bounded reads of input files: a file given to dssm-certs (`--dhparam`, `--dir`, the CA files,
//! `probe`'s materials) is a few KB of PEM; `/dev/zero` or a log file given by mistake must not
//! exhaust memory.

use std::io::Read;
use std::path::Path;

/// The most any input file may hold: PEM materials are a few KB; this leaves room for long
/// bundles and comments.
pub const MAX_INPUT_BYTES: u64 = 4 * 1024 * 1024;

/// Reads at most [`MAX_INPUT_BYTES`] of `path`; a larger file (or an endless one) is an error
/// that names the limit (callers name the file).
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    read_at_most(path, MAX_INPUT_BYTES)
}

fn read_at_most(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, the most an input file may hold: not PEM materials",
                max / (1024 * 1024)
            ),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_file_is_refused_after_the_limit_naming_it() {
        let e = read_bounded(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("larger than 4 MiB"), "{e}");
        assert!(read_bounded(Path::new("/dev/null")).unwrap().is_empty());
    }
}
