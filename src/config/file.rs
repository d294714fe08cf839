//! Reading the config file without trusting it: whatever the path turns out to be, a read
//! ends promptly, holds a bounded amount of memory, and a refusal says why.
//!
//! The path is whatever an operator (or a careless symlink) makes it, and it is read again on
//! every reload, so:
//! - **A regular file only.** The path is `stat`ed (following symlinks) before it is opened, so
//!   a directory, a named pipe, a device (`/dev/zero`, a tty) or a socket is refused without
//!   being opened at all; then it is opened with `O_NONBLOCK` (an open that is not a regular
//!   file's after all, because the path changed in between, cannot wait for a writer) and
//!   `fstat`ed again, and only a regular file is read.
//! - **At most [`MAX_BYTES`].** Checked from `fstat`, and the read itself stops one byte past
//!   the cap (a file that grows while it is read, or a `/proc`-style file that reports size 0,
//!   cannot make it read more).
//! - **A bounded shape.** Before any JSON value is built, [`check_shape`] scans the text once
//!   (no allocation) for nesting deeper than [`MAX_DEPTH`], more than [`MAX_VALUES`] values, or
//!   more than [`MAX_CONTAINERS`] objects and arrays, and names the line and column where the
//!   limit is crossed. What a parsed document costs depends on its shape far more than on its
//!   size (an empty object `{}` in the text is three bytes; as a parsed map with one key it is
//!   hundreds), so these caps, not the byte cap, are what bound the memory of a parse
//!   (`tests/hostile_config.rs` measures the worst file they admit; figures in
//!   docs/reliability.md).
//!
//! Why these numbers: a config has four levels (the top object, `targets`, a target, one of
//! its keys); a target takes about 10 values (its object, four keys and their values) and one
//! or two objects; 10,000 targets, far more than a hash over the targets is meant for, take
//! about 1 MiB of text, 100,000 values and 10,000 objects. The caps leave five times that and
//! more, while a hostile file within them costs tens of MiB to parse, not gigabytes.
//!
//! Blocking (file system calls): callers run it off the async runtime's worker threads.

use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::ConfigError;

/// Largest config file read, in bytes (16 MiB).
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Deepest nesting of objects and arrays (a config needs 4).
pub const MAX_DEPTH: usize = 32;

/// Most JSON values in a file: every object, array, string (keys included), number, `true`,
/// `false` and `null` counts one.
pub const MAX_VALUES: usize = 500_000;

/// Most objects and arrays in a file (each parsed object is a map: the costly kind of value).
pub const MAX_CONTAINERS: usize = 50_000;

/// Reads the config file at `path` as text, refusing anything but a regular UTF-8 file of at
/// most [`MAX_BYTES`].
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let io_error = |source| ConfigError::Io {
        file: path.to_path_buf(),
        source,
    };
    regular(path, &std::fs::metadata(path).map_err(io_error)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_error)?;
    regular(path, &file.metadata().map_err(io_error)?)?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_large(path, None));
    }
    String::from_utf8(bytes).map_err(|e| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {}); save the file as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        ))
    })
}

/// Accepts the metadata of a regular file of at most [`MAX_BYTES`].
fn regular(path: &Path, meta: &Metadata) -> Result<(), ConfigError> {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return match meta.len() {
            len if len > MAX_BYTES => Err(too_large(path, Some(len))),
            _ => Ok(()),
        };
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe (FIFO)"
    } else if kind.is_char_device() {
        "a character device (such as /dev/zero or a terminal)"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(ConfigError::File {
        file: path.to_path_buf(),
        message: format!(
            "is {what}, not a regular file; the config must be a regular file (a symlink to \
             one is fine), so it is not read"
        ),
    })
}

fn too_large(path: &Path, len: Option<u64>) -> ConfigError {
    let size = match len {
        Some(len) => format!("{len} bytes"),
        None => "the file".to_string(),
    };
    ConfigError::File {
        file: path.to_path_buf(),
        message: format!(
            "{size} is more than a config file may hold ({} MiB), so it is not read",
            MAX_BYTES >> 20
        ),
    }
}

/// Checks the nesting depth and the number of values of the JSON in `text` against
/// [`MAX_DEPTH`], [`MAX_VALUES`] and [`MAX_CONTAINERS`], in one pass and without allocating.
/// It counts tokens, it does not validate: text that is not JSON passes here and fails in the
/// parser, with the parser's message.
pub fn check_shape(path: &Path, text: &str) -> Result<(), ConfigError> {
    let mut depth = 0usize;
    let mut values = 0usize;
    let mut containers = 0usize;
    let (mut in_string, mut escaped, mut in_scalar) = (false, false, false);
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        let limit = match b {
            b'"' => {
                in_string = true;
                in_scalar = false;
                values += 1;
                None
            }
            b'{' | b'[' => {
                in_scalar = false;
                depth += 1;
                values += 1;
                containers += 1;
                if depth > MAX_DEPTH {
                    Some(format!(
                        "objects and arrays nested more than {MAX_DEPTH} deep (a config needs 4)"
                    ))
                } else if containers > MAX_CONTAINERS {
                    Some(format!(
                        "more than {MAX_CONTAINERS} objects and arrays (each target is one)"
                    ))
                } else {
                    None
                }
            }
            b'}' | b']' => {
                in_scalar = false;
                depth = depth.saturating_sub(1);
                None
            }
            b',' | b':' | b' ' | b'\t' | b'\n' | b'\r' => {
                in_scalar = false;
                None
            }
            _ if in_scalar => None,
            _ => {
                in_scalar = true;
                values += 1;
                None
            }
        };
        let limit = limit.or_else(|| {
            (values > MAX_VALUES).then(|| {
                format!(
                    "more than {MAX_VALUES} JSON values (each target takes about 10: its \
                     object, keys and values)"
                )
            })
        });
        if let Some(what) = limit {
            let (line, column) = position(text, i);
            return Err(ConfigError::Syntax {
                file: path.to_path_buf(),
                line,
                column,
                message: format!("{what}; the file is not parsed further"),
            });
        }
    }
    Ok(())
}

/// The 1-based line and column (in bytes, as serde_json counts) of byte `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::PathBuf;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let dir = std::env::temp_dir()
                .join(format!("stickylb-file-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn refusal(path: &Path) -> String {
        let e = read(path).expect_err("refused");
        let msg = e.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn a_regular_file_is_read() {
        let dir = Dir::new("regular");
        let path = dir.0.join("c.json");
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(read(&path).unwrap(), "{}");
        // Through a symlink too.
        let link = dir.0.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read(&link).unwrap(), "{}");
    }

    #[test]
    fn a_fifo_a_directory_and_a_device_are_refused_without_blocking() {
        let dir = Dir::new("kinds");
        let fifo = dir.0.join("fifo.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: an open without O_NONBLOCK would wait here for ever.
        assert!(refusal(&fifo).contains("is a named pipe (FIFO), not a regular file"));
        assert!(refusal(&dir.0).contains("is a directory, not a regular file"));
        let zero = dir.0.join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(refusal(&zero).contains("is a character device"));
    }

    #[test]
    fn a_file_over_the_cap_is_refused_before_it_is_read() {
        let dir = Dir::new("large");
        let path = dir.0.join("big.json");
        let file = File::create(&path).unwrap();
        file.set_len(MAX_BYTES + 1).unwrap(); // sparse: costs no disk
        let msg = refusal(&path);
        assert!(
            msg.contains(&format!("{} bytes is more than", MAX_BYTES + 1)),
            "{msg}"
        );
        assert!(msg.contains("16 MiB"), "{msg}");
        file.set_len(MAX_BYTES).unwrap();
        assert!(
            read(&path).expect("at the cap").len() as u64 == MAX_BYTES,
            "the cap itself is allowed"
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_with_its_offset() {
        let dir = Dir::new("utf8");
        let path = dir.0.join("c.json");
        std::fs::write(&path, b"{\"a\": \"\xff\"}").unwrap();
        assert!(refusal(&path).contains("not UTF-8 text (invalid byte at offset 7)"));
    }

    fn shape(text: &str) -> Result<(), String> {
        check_shape(Path::new("c.json"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn nesting_past_the_cap_is_refused_at_its_line_and_column() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(shape(&ok), Ok(()));
        // The object is level 1: the 32nd bracket, at column 8 + 31, is level 33.
        let deep = format!("{{\n  \"a\": {}", "[".repeat(MAX_DEPTH));
        let msg = shape(&deep).unwrap_err();
        assert!(
            msg.starts_with(&format!("c.json:2:{}: invalid JSON: ", 8 + MAX_DEPTH - 1)),
            "{msg}"
        );
        assert!(msg.contains("nested more than 32 deep"), "{msg}");
        // Brackets inside strings are text, not nesting.
        let quoted = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(100), "{".repeat(100));
        assert_eq!(shape(&quoted), Ok(()));
    }

    #[test]
    fn too_many_values_or_containers_are_refused() {
        // The top array counts too: 1 + (MAX_VALUES - 2) + 1.
        let values = format!("[{}0]", "0,".repeat(MAX_VALUES - 2));
        assert_eq!(shape(&values), Ok(()), "the top array and its elements");
        let values = format!("[{}0]", "0,".repeat(MAX_VALUES - 1));
        let msg = shape(&values).unwrap_err();
        assert!(msg.contains("more than 500000 JSON values"), "{msg}");
        let strings = format!("[{}\"\"]", "\"\",".repeat(MAX_VALUES - 1));
        assert!(shape(&strings).is_err());
        let objects = format!("[{}{{}}]", "{},".repeat(MAX_CONTAINERS - 2));
        assert_eq!(shape(&objects), Ok(()));
        let objects = format!("[{}{{}}]", "{},".repeat(MAX_CONTAINERS - 1));
        let msg = shape(&objects).unwrap_err();
        assert!(msg.contains("more than 50000 objects and arrays"), "{msg}");
    }

    #[test]
    fn a_scalar_of_many_characters_counts_once() {
        // The top array and MAX_VALUES - 1 elements: exactly at the cap.
        for scalar in ["true", "-1.5e3", "null", "\"a,b:c\""] {
            let text = format!("[{}{scalar}]", format!("{scalar}, ").repeat(MAX_VALUES - 2));
            assert_eq!(shape(&text), Ok(()), "{scalar}");
            let text = format!("[{}{scalar}]", format!("{scalar},").repeat(MAX_VALUES - 1));
            assert!(shape(&text).is_err(), "{scalar}");
        }
    }
}
