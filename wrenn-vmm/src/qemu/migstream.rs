//! Filtering QEMU's migration stream into a device-state file.
//!
//! Guest RAM is a private (copy-on-write) mapping of a memory base, so QEMU's
//! `x-ignore-shared` cannot keep it out of the stream. The stream is therefore
//! read here: every RAM page record is dropped from what is written (the pages
//! that matter are kept separately, from the `wanted` set), while the RAM
//! section framing (block list, end-of-section markers) and every device section
//! pass through unchanged. Loading the result restores devices and CPUs and leaves
//! RAM as mapped, to be overlaid with the saved pages.
//!
//! Format facts (QEMU 7.2 `migration/savevm.c`, `migration/ram.c`), with
//! `migration.send-configuration=off`: `QEVM` magic and version, then sections;
//! iterative `ram` sections (START/PART/END) hold records `be64(offset | flags)`;
//! after the last iterative section only device sections follow, which are copied
//! verbatim to the end.

use std::collections::HashSet;
use std::io::{self, Read, Write};

const FILE_MAGIC: u32 = 0x5145_564d;
const FILE_VERSION: u32 = 3;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_FOOTER: u8 = 0x7e;
const VM_EOF: u8 = 0x10;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
const FLAG_MASK: u64 = 0xfff;

pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("Reading the migration stream")]
    Io(#[from] io::Error),
    #[error("Unsupported migration stream: {0}")]
    Unsupported(String),
}

/// Pages captured from the stream: `(page index, bytes or None for a zero page)`.
pub type Captured = Vec<(u64, Option<Vec<u8>>)>;

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_be32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_be64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_idstr(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = read_u8(r)? as usize;
    let mut s = vec![0u8; len];
    r.read_exact(&mut s)?;
    Ok(s)
}

/// Copies the stream from `input` to `output` without RAM page records, and
/// returns the pages of RAM block `block` whose index is in `wanted`.
pub fn filter(
    input: &mut impl Read,
    output: &mut impl Write,
    block: &str,
    wanted: &HashSet<u64>,
) -> Result<Captured, StreamError> {
    let magic = read_be32(input)?;
    let version = read_be32(input)?;
    if magic != FILE_MAGIC || version != FILE_VERSION {
        return Err(StreamError::Unsupported(format!(
            "magic {magic:#x} version {version}"
        )));
    }
    output.write_all(&magic.to_be_bytes())?;
    output.write_all(&version.to_be_bytes())?;
    let mut ram_sections: HashSet<u32> = HashSet::new();
    let mut captured = Vec::new();
    // The block of CONTINUE records: QEMU's "last sent block" survives section boundaries.
    let mut current: Vec<u8> = Vec::new();
    loop {
        let kind = read_u8(input)?;
        match kind {
            SECTION_START => {
                let id = read_be32(input)?;
                let name = read_idstr(input)?;
                let instance = read_be32(input)?;
                let version = read_be32(input)?;
                if name != b"ram" {
                    return Err(StreamError::Unsupported(format!(
                        "iterative section {:?}",
                        String::from_utf8_lossy(&name)
                    )));
                }
                output.write_all(&[kind])?;
                output.write_all(&id.to_be_bytes())?;
                output.write_all(&[name.len() as u8])?;
                output.write_all(&name)?;
                output.write_all(&instance.to_be_bytes())?;
                output.write_all(&version.to_be_bytes())?;
                ram_sections.insert(id);
                filter_ram(input, output, block, wanted, &mut captured, &mut current)?;
                copy_footer(input, output, id)?;
            }
            SECTION_PART | SECTION_END => {
                let id = read_be32(input)?;
                if !ram_sections.contains(&id) {
                    return Err(StreamError::Unsupported(format!(
                        "section {id} is not the ram section"
                    )));
                }
                output.write_all(&[kind])?;
                output.write_all(&id.to_be_bytes())?;
                filter_ram(input, output, block, wanted, &mut captured, &mut current)?;
                copy_footer(input, output, id)?;
            }
            SECTION_FULL | VM_EOF => {
                // Device state and the end: copied as they are.
                output.write_all(&[kind])?;
                io::copy(input, output)?;
                return Ok(captured);
            }
            other => {
                return Err(StreamError::Unsupported(format!("section type {other:#x}")));
            }
        }
    }
}

fn copy_footer(input: &mut impl Read, output: &mut impl Write, id: u32) -> Result<(), StreamError> {
    let t = read_u8(input)?;
    let fid = read_be32(input)?;
    if t != SECTION_FOOTER || fid != id {
        return Err(StreamError::Unsupported(format!(
            "bad section footer {t:#x} for section {id}"
        )));
    }
    output.write_all(&[t])?;
    output.write_all(&fid.to_be_bytes())?;
    Ok(())
}

fn filter_ram(
    input: &mut impl Read,
    output: &mut impl Write,
    block: &str,
    wanted: &HashSet<u64>,
    captured: &mut Captured,
    current: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let mut page = vec![0u8; PAGE_SIZE];
    loop {
        let header = read_be64(input)?;
        let flags = header & FLAG_MASK;
        let addr = header & !FLAG_MASK;
        if flags & FLAG_MEM_SIZE != 0 {
            output.write_all(&header.to_be_bytes())?;
            let mut left = addr;
            while left > 0 {
                let name = read_idstr(input)?;
                let used = read_be64(input)?;
                output.write_all(&[name.len() as u8])?;
                output.write_all(&name)?;
                output.write_all(&used.to_be_bytes())?;
                left = left.checked_sub(used).ok_or_else(|| {
                    StreamError::Unsupported("RAM block sizes exceed the total".into())
                })?;
            }
            continue;
        }
        if flags & FLAG_EOS != 0 {
            output.write_all(&header.to_be_bytes())?;
            return Ok(());
        }
        if flags & (FLAG_ZERO | FLAG_PAGE) != 0 {
            if flags & FLAG_CONTINUE == 0 {
                *current = read_idstr(input)?;
            }
            let index = addr / PAGE_SIZE as u64;
            let ours = current.as_slice() == block.as_bytes() && wanted.contains(&index);
            if flags & FLAG_ZERO != 0 {
                let fill = read_u8(input)?;
                if ours {
                    captured.push((
                        index,
                        if fill == 0 {
                            None
                        } else {
                            Some(vec![fill; PAGE_SIZE])
                        },
                    ));
                }
            } else {
                input.read_exact(&mut page)?;
                if ours {
                    captured.push((index, Some(page.clone())));
                }
            }
            continue;
        }
        if flags & FLAG_MULTIFD_FLUSH != 0 {
            output.write_all(&header.to_be_bytes())?;
            continue;
        }
        return Err(StreamError::Unsupported(format!(
            "RAM record flags {flags:#x}"
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idstr(v: &mut Vec<u8>, s: &str) {
        v.push(s.len() as u8);
        v.extend_from_slice(s.as_bytes());
    }

    /// A small stream shaped like QEMU's: ram START with the block list, a PART
    /// with pages of two blocks, an END, then a device section and EOF.
    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&FILE_MAGIC.to_be_bytes());
        v.extend_from_slice(&FILE_VERSION.to_be_bytes());
        v.push(SECTION_START);
        v.extend_from_slice(&2u32.to_be_bytes());
        idstr(&mut v, "ram");
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&4u32.to_be_bytes());
        v.extend_from_slice(&((3 * 4096u64) | FLAG_MEM_SIZE).to_be_bytes());
        idstr(&mut v, "mem");
        v.extend_from_slice(&(2 * 4096u64).to_be_bytes());
        idstr(&mut v, "bios");
        v.extend_from_slice(&4096u64.to_be_bytes());
        v.extend_from_slice(&FLAG_EOS.to_be_bytes());
        v.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        v.push(SECTION_PART);
        v.extend_from_slice(&2u32.to_be_bytes());
        v.extend_from_slice(&FLAG_PAGE.to_be_bytes());
        idstr(&mut v, "mem");
        v.extend_from_slice(&[0xaa; PAGE_SIZE]);
        v.extend_from_slice(&(4096u64 | FLAG_ZERO | FLAG_CONTINUE).to_be_bytes());
        v.push(0);
        v.extend_from_slice(&FLAG_PAGE.to_be_bytes());
        idstr(&mut v, "bios");
        v.extend_from_slice(&[0xbb; PAGE_SIZE]);
        v.extend_from_slice(&FLAG_EOS.to_be_bytes());
        v.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        v.push(SECTION_END);
        v.extend_from_slice(&2u32.to_be_bytes());
        // CONTINUE across sections: still the "bios" block of the previous record.
        v.extend_from_slice(&(4096u64 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        v.extend_from_slice(&[0xcc; PAGE_SIZE]);
        v.extend_from_slice(&FLAG_EOS.to_be_bytes());
        v.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        v.push(SECTION_FULL);
        v.extend_from_slice(b"device state bytes, opaque");
        v.push(VM_EOF);
        v
    }

    #[test]
    fn drops_pages_keeps_framing_and_devices() {
        let input = sample();
        let mut out = Vec::new();
        let wanted: HashSet<u64> = [0u64, 1].into_iter().collect();
        let captured = filter(&mut input.as_slice(), &mut out, "mem", &wanted).unwrap();
        assert_eq!(captured.len(), 2);
        assert_eq!(captured[0], (0, Some(vec![0xaa; PAGE_SIZE])));
        assert_eq!(captured[1], (1, None));
        assert!(
            out.len() < 200,
            "pages leaked into the device state: {} bytes",
            out.len()
        );
        let dev: &[u8] = b"device state bytes, opaque";
        assert!(out.windows(dev.len()).any(|w| w == dev));
        // The filtered stream is itself a valid stream with nothing to drop.
        let mut again = Vec::new();
        let none = filter(&mut out.as_slice(), &mut again, "mem", &wanted).unwrap();
        assert!(none.is_empty());
        assert_eq!(again, out);
    }

    #[test]
    fn only_wanted_pages_are_captured() {
        let input = sample();
        let wanted: HashSet<u64> = [1u64].into_iter().collect();
        let captured = filter(&mut input.as_slice(), &mut Vec::new(), "mem", &wanted).unwrap();
        assert_eq!(captured, vec![(1, None)]);
    }

    #[test]
    fn truncated_or_foreign_streams_are_errors() {
        let input = sample();
        for cut in [3usize, 9, 40, 100, 4200] {
            assert!(
                filter(&mut &input[..cut], &mut Vec::new(), "mem", &HashSet::new()).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = input.clone();
        bad[0] = 0;
        assert!(matches!(
            filter(&mut bad.as_slice(), &mut Vec::new(), "mem", &HashSet::new()),
            Err(StreamError::Unsupported(_))
        ));
    }
}
