//! The envd wire messages, generated at build time from `proto/process.proto` and
//! `proto/filesystem.proto` for the guest agent and the host client alike.
//!
//! prost gives the binary codec, pbjson the protobuf JSON mapping the Connect JSON
//! codec needs: lowerCamelCase names on output (either spelling accepted on input),
//! 64-bit integers as strings, `bytes` as base64 (any alphabet, padded or not),
//! enums by name (numbers accepted), timestamps as RFC 3339, default values omitted
//! and unknown fields ignored, as envd's own JSON codec does.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;

/// `google.protobuf.Timestamp`. In JSON an RFC 3339 string: written in UTC with a
/// `Z` (JavaScript clients accept no other form with fractions), read with any offset.
#[derive(Clone, Copy, PartialEq, Eq, ::prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Times before 1970 do not occur in envd's answers; they render as the epoch.
        let secs = u64::try_from(self.seconds).unwrap_or(0);
        let nanos = u32::try_from(self.nanos).unwrap_or(0);
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        if nanos == 0 {
            s.collect_str(&humantime::format_rfc3339_seconds(t))
        } else {
            s.collect_str(&humantime::format_rfc3339_nanos(t))
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = pbjson_types::Timestamp::deserialize(d)?;
        Ok(Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        })
    }
}

/// Messages of the `process.Process` service.
#[allow(missing_debug_implementations, clippy::all)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));

    impl ProcessSelector {
        pub fn pid(pid: u32) -> Self {
            ProcessSelector {
                selector: Some(process_selector::Selector::Pid(pid)),
            }
        }
        pub fn tag(tag: impl Into<String>) -> Self {
            ProcessSelector {
                selector: Some(process_selector::Selector::Tag(tag.into())),
            }
        }
    }

    /// `Start` and `Connect` stream the same events in the same envelope.
    macro_rules! event_response {
        ($($t:ident),*) => {$(
            impl From<process_event::Event> for $t {
                fn from(event: process_event::Event) -> Self {
                    $t {
                        event: Some(ProcessEvent { event: Some(event) }),
                    }
                }
            }
        )*};
    }
    event_response!(StartResponse, ConnectResponse);
}

/// Messages of the `filesystem.Filesystem` service.
#[allow(missing_debug_implementations, clippy::all)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));

    /// `WatchDir` and `CreateWatcher` take the same request.
    impl From<CreateWatcherRequest> for WatchDirRequest {
        fn from(r: CreateWatcherRequest) -> Self {
            WatchDirRequest {
                path: r.path,
                recursive: r.recursive,
                include_entry: r.include_entry,
                allow_network_mounts: r.allow_network_mounts,
            }
        }
    }
}

/// Body of `POST /init`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<HashMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// RFC 3339 host time (numbers are accepted as unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// Wrenn's extension: base64 bytes from the host's CSPRNG that the guest
    /// mixes into its kernel RNG and reseeds from (clones of one snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
}

/// Body of `GET /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub ts: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f32,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// One element of the `POST /files` response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadedEntry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub metadata: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::filesystem::*;
    use super::process::process_event::{
        data_event::Output, DataEvent, EndEvent, Event, StartEvent,
    };
    use super::process::process_input::Input;
    use super::process::*;
    use super::*;
    use bytes::Bytes;
    use prost::Message;

    #[test]
    fn process_events_are_protojson() {
        let ev = StartResponse::from(Event::Data(DataEvent {
            output: Some(Output::Stdout(Bytes::from_static(b"hi\n"))),
        }));
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(s, r#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        let back: StartResponse = serde_json::from_str(&s).unwrap();
        assert_eq!(back, ev);

        // Default values are left out, as envd's JSON codec does.
        let end = ConnectResponse::from(Event::End(EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: None,
        }));
        let s = serde_json::to_string(&end).unwrap();
        assert_eq!(
            s,
            r#"{"event":{"end":{"exitCode":-1,"status":"signal: killed"}}}"#
        );
        let keepalive = StartResponse::from(Event::Keepalive(Default::default()));
        assert_eq!(
            serde_json::to_string(&keepalive).unwrap(),
            r#"{"event":{"keepalive":{}}}"#
        );
    }

    #[test]
    fn selectors_and_enums_parse_leniently() {
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"42"},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(r.process, Some(ProcessSelector::pid(42)));
        assert_eq!(r.signal(), Signal::Sigkill);
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"tag":"x"},"signal":15}"#).unwrap();
        assert_eq!(r.process, Some(ProcessSelector::tag("x")));
        assert_eq!(r.signal(), Signal::Sigterm);
        assert!(serde_json::from_str::<SendSignalRequest>(r#"{"signal":"SIGFOO"}"#).is_err());
        // A oneof takes one member.
        assert!(
            serde_json::from_str::<ConnectRequest>(r#"{"process":{"pid":1,"tag":"x"}}"#).is_err()
        );
    }

    #[test]
    fn snake_case_unpadded_base64_and_unknown_fields_accepted() {
        let r: WatchDirRequest = serde_json::from_str(
            r#"{"path":"/x","include_entry":true,"allowNetworkMounts":true,"newerField":1}"#,
        )
        .unwrap();
        assert!(r.include_entry && r.allow_network_mounts);
        let i: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"stdin":"aGk"}}"#).unwrap();
        assert_eq!(
            i.input.and_then(|i| i.input),
            Some(Input::Stdin(Bytes::from_static(b"hi")))
        );
        let i: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"pty":"-_8="}}"#).unwrap();
        assert_eq!(
            i.input.and_then(|i| i.input),
            Some(Input::Pty(Bytes::from_static(&[0xfb, 0xff])))
        );
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/true","envs":{"A":"1"},"cwd":null},"stdin":false}"#,
        )
        .unwrap();
        assert_eq!(r.stdin, Some(false));
        assert_eq!(r.process.map(|p| p.envs.len()), Some(1));
    }

    #[test]
    fn entry_info_int64_is_a_string_and_timestamp_rfc3339() {
        let mut e = EntryInfo {
            name: "a".into(),
            size: 4096,
            modified_time: Some(Timestamp {
                seconds: 1,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        e.set_type(FileType::File);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["size"], "4096");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["modifiedTime"], "1970-01-01T00:00:01.500000000Z");
        let back: EntryInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let n: EntryInfo = serde_json::from_str(
            r#"{"size":7,"type":2,"modified_time":"1970-01-01T01:00:00+01:00"}"#,
        )
        .unwrap();
        assert_eq!(n.size, 7);
        assert_eq!(n.r#type(), FileType::Directory);
        assert_eq!(n.modified_time.map(|t| t.seconds), Some(0));
    }

    #[test]
    fn binary_codec_round_trips() {
        let ev = StartResponse::from(Event::Start(StartEvent { pid: 7 }));
        let bytes = ev.encode_to_vec();
        assert_eq!(StartResponse::decode(bytes.as_slice()).unwrap(), ev);
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/true".into(),
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        };
        assert_eq!(
            StartRequest::decode(req.encode_to_vec().as_slice()).unwrap(),
            req
        );
    }
}
