//! The compression options: which methods, their levels, XBZRLE's cache.

use protocol::{CompMethod, MigrateOptions};

use super::InvalidFlags;

/// The compression options, as libvirt checks them: methods need
/// `--compressed`, each once; XBZRLE works on one stream only, zlib and
/// zstd on multifd's channels only, and one of them at most; a level or a
/// cache only for its method, and in QEMU's range.
pub(super) fn compression(o: &MigrateOptions) -> Result<(), InvalidFlags> {
    use InvalidFlags::*;
    let methods = &o.comp_methods;
    if !methods.is_empty() && !o.compressed {
        return Err(Needs {
            option: "--comp-methods",
            needs: "--compressed",
        });
    }
    for (i, m) in methods.iter().enumerate() {
        if methods[..i].contains(m) {
            return Err(RepeatedMethod(*m));
        }
    }
    let xbzrle = o.compressed && (methods.is_empty() || methods.contains(&CompMethod::Xbzrle));
    let multifd: Vec<CompMethod> = methods.iter().copied().filter(|m| m.multifd()).collect();
    if multifd.len() > 1 {
        return Err(Exclusive("--comp-methods zlib", "--comp-methods zstd"));
    }
    if xbzrle && o.parallel {
        return Err(Incompatible(
            "--compressed (XBZRLE)",
            "--parallel (multifd)",
        ));
    }
    if !multifd.is_empty() && !o.parallel {
        return Err(Needs {
            option: "--comp-methods zlib|zstd",
            needs: "--parallel (they compress multifd's channels)",
        });
    }
    for (level, method, option, max) in [
        (o.comp_zlib_level, CompMethod::Zlib, "--comp-zlib-level", 9),
        (o.comp_zstd_level, CompMethod::Zstd, "--comp-zstd-level", 20),
    ] {
        let Some(level) = level else { continue };
        if !methods.contains(&method) {
            return Err(Needs {
                option,
                needs: if method == CompMethod::Zlib {
                    "--compressed --comp-methods zlib"
                } else {
                    "--compressed --comp-methods zstd"
                },
            });
        }
        if level > max {
            return Err(Range {
                option,
                min: "0",
                max: if max == 9 { "9" } else { "20" },
                got: level.to_string(),
            });
        }
    }
    if let Some(bytes) = o.comp_xbzrle_cache {
        if !xbzrle {
            return Err(Needs {
                option: "--comp-xbzrle-cache",
                needs: "--compressed with XBZRLE",
            });
        }
        if bytes < 4096 || !bytes.is_power_of_two() {
            return Err(XbzrleCache(bytes));
        }
    }
    Ok(())
}
