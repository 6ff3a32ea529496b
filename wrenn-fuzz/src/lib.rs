//! What each fuzz target checks, as plain functions: `fuzz/` runs them under
//! libFuzzer (`cargo fuzz run NAME`), and `tests/corpora.rs` replays every input
//! committed under `fuzz/corpus/NAME/` on each `cargo test`, so a crash found
//! once stays fixed. Each function panics when an invariant breaks; bad input
//! must only ever produce an error.

use std::collections::HashSet;
use std::path::{Component, Path};

/// A target's checks over one input; panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// The targets, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("snapshot_header", snapshot_header),
    ("migration_stream", migration_stream),
    ("connect_envelope", connect_envelope),
    ("multipart_upload", multipart_upload),
];

/// Memory snapshot headers (`memory.header`: generations and extents): what
/// decodes is valid, and encodes to bytes that decode to the same header.
pub fn snapshot_header(data: &[u8]) {
    use wrenn_storage::snapshot::header;
    let Ok(h) = header::decode(data) else { return };
    if let Err(reason) = h.validate() {
        panic!("decoded an invalid header: {reason}");
    }
    let again = header::decode(&h.encode()).expect("an encoded header decodes");
    assert_eq!(again, h, "encode/decode round trip changed the header");
}

/// QEMU's migration stream through the RAM-page filter: the first two bytes
/// choose the pages wanted (bit i: page i), the rest is the stream. What is
/// written is never more than what was read, and only wanted pages of the named
/// block are captured.
pub fn migration_stream(data: &[u8]) {
    use wrenn_vmm::qemu::migstream::{filter, PAGE_SIZE};
    let (sel, stream) = data.split_at(data.len().min(2));
    let bits = sel.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b));
    let wanted: HashSet<u64> = (0..16).filter(|i| bits & (1 << i) != 0).collect();
    let mut out = Vec::new();
    let mut input = stream;
    if let Ok(captured) = filter(&mut input, &mut out, "mem", &wanted) {
        assert!(
            out.len() <= stream.len(),
            "the filter wrote more than it read"
        );
        for (index, page) in captured {
            assert!(wanted.contains(&index), "captured unwanted page {index}");
            if let Some(p) = page {
                assert_eq!(p.len(), PAGE_SIZE);
            }
        }
    }
}

/// Connect's envelope framing, fed in chunks (the first byte sets the chunk
/// size): the envelopes and the error are the same as when the body arrives
/// whole, and every envelope re-frames to the bytes it came from.
pub fn connect_envelope(data: &[u8]) {
    use wrenn_envd::connect::{encode_envelope, Envelope, EnvelopeDecoder};
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step.max(1));
    fn drain(dec: &mut EnvelopeDecoder, out: &mut Vec<Envelope>) -> Option<String> {
        loop {
            match dec.next_envelope() {
                Ok(Some(e)) => out.push(e),
                Ok(None) => return None,
                Err(e) => return Some(format!("{e:?}")),
            }
        }
    }
    let mut whole = EnvelopeDecoder::new();
    whole.push(body);
    let mut expected = Vec::new();
    let whole_err = drain(&mut whole, &mut expected);

    let mut chunked = EnvelopeDecoder::new();
    let mut got = Vec::new();
    let mut chunked_err = None;
    for chunk in body.chunks(step) {
        chunked.push(chunk);
        chunked_err = drain(&mut chunked, &mut got);
        if chunked_err.is_some() {
            break;
        }
    }
    assert_eq!(got, expected, "chunking changed the envelopes");
    assert_eq!(chunked_err, whole_err, "chunking changed the error");
    if whole_err.is_none() {
        assert_eq!(chunked.finish().is_ok(), whole.finish().is_ok());
    }
    let mut reframed = Vec::new();
    for e in &expected {
        reframed.extend_from_slice(&encode_envelope(e.flags, &e.data));
    }
    assert_eq!(&body[..reframed.len()], &reframed[..], "re-framing differs");
}

/// A multipart upload to envd: the body (boundary `B`) is parsed as the server
/// parses it, and every file part's destination is absolute and normalised (no
/// `.` or `..`), or the part is refused; no two accepted parts share a file.
/// A first byte of 1 adds the `path` query parameter `../q`.
pub fn multipart_upload(data: &[u8]) {
    use wrenn_envd::server::upload::Destinations;
    use wrenn_envd::server::users::resolve;
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let query = (mode == 1).then_some("../q");
    let home = Path::new("/home/user");
    let base = Path::new("/home/user/work");
    let stream =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(body))]);
    let mut mp = multer::Multipart::new(stream, "B");
    let mut dests = Destinations::new(query);
    let mut accepted = HashSet::new();
    futures_util::FutureExt::now_or_never(async {
        while let Ok(Some(field)) = mp.next_field().await {
            if field.name() != Some("file") {
                continue;
            }
            let name = field.file_name().map(str::to_owned);
            if let Ok(path) = dests.next(name.as_deref(), |p| resolve(p, home, base)) {
                assert!(path.is_absolute(), "relative destination {path:?}");
                assert!(
                    path.components()
                        .all(|c| !matches!(c, Component::CurDir | Component::ParentDir)),
                    "unnormalised destination {path:?}"
                );
                assert!(accepted.insert(path.clone()), "two parts to {path:?}");
            }
            if field.bytes().await.is_err() {
                break;
            }
        }
    })
    .expect("a body held in memory parses without waiting");
}
