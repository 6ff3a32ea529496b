//! The envd wire messages (`process.proto`, `filesystem.proto`), defined once for
//! the guest agent and the host client.
//!
//! Every message derives both `prost::Message` (binary codec) and serde with the
//! protobuf JSON conventions (JSON codec). Field numbers follow E2B's envd protos;
//! JSON names are lowerCamelCase on output and both spellings are accepted on input.

use crate::json::{self, proto_enum};
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;

/// `google.protobuf.Timestamp`; RFC 3339 in JSON.
#[derive(Clone, Copy, PartialEq, Eq, ::prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&json::format_rfc3339(self.seconds, self.nanos))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (seconds, nanos) = json::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {s:?}")))?;
        Ok(Timestamp { seconds, nanos })
    }
}

/// Messages of the `process.Process` service.
pub mod process {
    use super::*;

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct PtySize {
        #[prost(uint32, tag = "1")]
        #[serde(deserialize_with = "json::int32::deserialize_u32")]
        pub cols: u32,
        #[prost(uint32, tag = "2")]
        #[serde(deserialize_with = "json::int32::deserialize_u32")]
        pub rows: u32,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct Pty {
        #[prost(message, optional, tag = "1")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub size: Option<PtySize>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessConfig {
        #[prost(string, tag = "1")]
        pub cmd: String,
        #[prost(string, repeated, tag = "2")]
        pub args: Vec<String>,
        #[prost(map = "string, string", tag = "3")]
        pub envs: HashMap<String, String>,
        #[prost(string, optional, tag = "4")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub cwd: Option<String>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct ListRequest {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessInfo {
        #[prost(message, optional, tag = "1")]
        pub config: Option<ProcessConfig>,
        #[prost(uint32, tag = "2")]
        pub pid: u32,
        #[prost(string, optional, tag = "3")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tag: Option<String>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ListResponse {
        #[prost(message, repeated, tag = "1")]
        pub processes: Vec<ProcessInfo>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct StartRequest {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessConfig>,
        #[prost(message, optional, tag = "2")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub pty: Option<Pty>,
        #[prost(string, optional, tag = "3")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tag: Option<String>,
        #[prost(bool, optional, tag = "4")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub stdin: Option<bool>,
    }

    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum Selector {
        #[prost(uint32, tag = "1")]
        Pid(#[serde(deserialize_with = "json::int32::deserialize_u32")] u32),
        #[prost(string, tag = "2")]
        Tag(String),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessSelector {
        #[prost(oneof = "Selector", tags = "1, 2")]
        #[serde(flatten)]
        pub selector: Option<Selector>,
    }

    impl ProcessSelector {
        pub fn pid(pid: u32) -> Self {
            ProcessSelector {
                selector: Some(Selector::Pid(pid)),
            }
        }
        pub fn tag(tag: impl Into<String>) -> Self {
            ProcessSelector {
                selector: Some(Selector::Tag(tag.into())),
            }
        }
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct UpdateRequest {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessSelector>,
        #[prost(message, optional, tag = "2")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub pty: Option<Pty>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct UpdateResponse {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct StartEvent {
        #[prost(uint32, tag = "1")]
        #[serde(deserialize_with = "json::int32::deserialize_u32")]
        pub pid: u32,
    }

    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum Output {
        #[prost(bytes = "bytes", tag = "1")]
        Stdout(#[serde(with = "json::b64")] Bytes),
        #[prost(bytes = "bytes", tag = "2")]
        Stderr(#[serde(with = "json::b64")] Bytes),
        #[prost(bytes = "bytes", tag = "3")]
        Pty(#[serde(with = "json::b64")] Bytes),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct DataEvent {
        #[prost(oneof = "Output", tags = "1, 2, 3")]
        #[serde(flatten)]
        pub output: Option<Output>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct EndEvent {
        #[prost(sint32, tag = "1")]
        #[serde(alias = "exit_code", deserialize_with = "json::int32::deserialize_i32")]
        pub exit_code: i32,
        #[prost(bool, tag = "2")]
        pub exited: bool,
        #[prost(string, tag = "3")]
        pub status: String,
        #[prost(string, optional, tag = "4")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct KeepAlive {}

    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum Event {
        #[prost(message, tag = "1")]
        Start(StartEvent),
        #[prost(message, tag = "2")]
        Data(DataEvent),
        #[prost(message, tag = "3")]
        End(EndEvent),
        #[prost(message, tag = "4")]
        Keepalive(KeepAlive),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessEvent {
        #[prost(oneof = "Event", tags = "1, 2, 3, 4")]
        #[serde(flatten)]
        pub event: Option<Event>,
    }

    /// Both `StartResponse` and `ConnectResponse`: the same shape on the wire.
    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct EventResponse {
        #[prost(message, optional, tag = "1")]
        pub event: Option<ProcessEvent>,
    }

    impl EventResponse {
        pub fn new(event: Event) -> Self {
            EventResponse {
                event: Some(ProcessEvent { event: Some(event) }),
            }
        }
    }

    pub type StartResponse = EventResponse;
    pub type ConnectResponse = EventResponse;

    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum Input {
        #[prost(bytes = "bytes", tag = "1")]
        Stdin(#[serde(with = "json::b64")] Bytes),
        #[prost(bytes = "bytes", tag = "2")]
        Pty(#[serde(with = "json::b64")] Bytes),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessInput {
        #[prost(oneof = "Input", tags = "1, 2")]
        #[serde(flatten)]
        pub input: Option<Input>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct SendInputRequest {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessSelector>,
        #[prost(message, optional, tag = "2")]
        pub input: Option<ProcessInput>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct SendInputResponse {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct StreamInputStart {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessSelector>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct StreamInputData {
        #[prost(message, optional, tag = "2")]
        pub input: Option<ProcessInput>,
    }

    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum StreamInputEvent {
        #[prost(message, tag = "1")]
        Start(StreamInputStart),
        #[prost(message, tag = "2")]
        Data(StreamInputData),
        #[prost(message, tag = "3")]
        Keepalive(KeepAlive),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct StreamInputRequest {
        #[prost(oneof = "StreamInputEvent", tags = "1, 2, 3")]
        #[serde(flatten)]
        pub event: Option<StreamInputEvent>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct StreamInputResponse {}

    proto_enum!(
        /// Signals a client may send.
        Signal {
            Unspecified = 0 => "SIGNAL_UNSPECIFIED",
            Sigterm = 15 => "SIGNAL_SIGTERM",
            Sigkill = 9 => "SIGNAL_SIGKILL",
        }
    );

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct SendSignalRequest {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessSelector>,
        #[prost(enumeration = "Signal", tag = "2")]
        #[serde(
            serialize_with = "json::enum_ser::<Signal, _>",
            deserialize_with = "json::enum_de::<Signal, _>"
        )]
        pub signal: i32,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct SendSignalResponse {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ProcessRequest {
        #[prost(message, optional, tag = "1")]
        pub process: Option<ProcessSelector>,
    }

    /// `CloseStdinRequest` and `ConnectRequest` share this shape.
    pub type CloseStdinRequest = ProcessRequest;
    pub type ConnectRequest = ProcessRequest;

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct CloseStdinResponse {}
}

/// Messages of the `filesystem.Filesystem` service.
pub mod filesystem {
    use super::*;

    proto_enum!(
        /// Kind of a filesystem entry.
        FileType {
            Unspecified = 0 => "FILE_TYPE_UNSPECIFIED",
            File = 1 => "FILE_TYPE_FILE",
            Directory = 2 => "FILE_TYPE_DIRECTORY",
            Symlink = 3 => "FILE_TYPE_SYMLINK",
        }
    );

    proto_enum!(
        /// Kind of a watch event.
        EventType {
            Unspecified = 0 => "EVENT_TYPE_UNSPECIFIED",
            Create = 1 => "EVENT_TYPE_CREATE",
            Write = 2 => "EVENT_TYPE_WRITE",
            Remove = 3 => "EVENT_TYPE_REMOVE",
            Rename = 4 => "EVENT_TYPE_RENAME",
            Chmod = 5 => "EVENT_TYPE_CHMOD",
        }
    );

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct EntryInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(enumeration = "FileType", tag = "2")]
        #[serde(
            serialize_with = "json::enum_ser::<FileType, _>",
            deserialize_with = "json::enum_de::<FileType, _>"
        )]
        pub r#type: i32,
        #[prost(string, tag = "3")]
        pub path: String,
        #[prost(int64, tag = "4")]
        #[serde(with = "json::i64s")]
        pub size: i64,
        #[prost(uint32, tag = "5")]
        #[serde(deserialize_with = "json::int32::deserialize_u32")]
        pub mode: u32,
        #[prost(string, tag = "6")]
        pub permissions: String,
        #[prost(string, tag = "7")]
        pub owner: String,
        #[prost(string, tag = "8")]
        pub group: String,
        #[prost(message, optional, tag = "9")]
        #[serde(alias = "modified_time", skip_serializing_if = "Option::is_none")]
        pub modified_time: Option<Timestamp>,
        #[prost(string, optional, tag = "10")]
        #[serde(alias = "symlink_target", skip_serializing_if = "Option::is_none")]
        pub symlink_target: Option<String>,
        #[prost(map = "string, string", tag = "11")]
        pub metadata: HashMap<String, String>,
        #[prost(bool, tag = "12")]
        #[serde(alias = "is_symlink")]
        pub is_symlink: bool,
    }

    /// `StatRequest`, `MakeDirRequest`, `RemoveRequest`: a single path.
    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct PathRequest {
        #[prost(string, tag = "1")]
        pub path: String,
    }

    pub type StatRequest = PathRequest;
    pub type MakeDirRequest = PathRequest;
    pub type RemoveRequest = PathRequest;

    /// `StatResponse`, `MakeDirResponse`, `MoveResponse`: a single entry.
    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct EntryResponse {
        #[prost(message, optional, tag = "1")]
        pub entry: Option<EntryInfo>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct RemoveResponse {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct MoveRequest {
        #[prost(string, tag = "1")]
        pub source: String,
        #[prost(string, tag = "2")]
        pub destination: String,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ListDirRequest {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(uint32, tag = "2")]
        #[serde(deserialize_with = "json::int32::deserialize_u32")]
        pub depth: u32,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ListDirResponse {
        #[prost(message, repeated, tag = "1")]
        pub entries: Vec<EntryInfo>,
    }

    /// `WatchDirRequest` and `CreateWatcherRequest` share this shape.
    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct WatchRequest {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(bool, tag = "2")]
        pub recursive: bool,
        #[prost(bool, tag = "3")]
        #[serde(alias = "include_entry")]
        pub include_entry: bool,
        #[prost(bool, tag = "4")]
        #[serde(alias = "allow_network_mounts")]
        pub allow_network_mounts: bool,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct FilesystemEvent {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(enumeration = "EventType", tag = "2")]
        #[serde(
            serialize_with = "json::enum_ser::<EventType, _>",
            deserialize_with = "json::enum_de::<EventType, _>"
        )]
        pub r#type: i32,
        #[prost(message, optional, tag = "3")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub entry: Option<EntryInfo>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct WatchStart {}

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct KeepAlive {}

    // A wire message: boxing the big variant would only move the allocation.
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, ::prost::Oneof, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub enum WatchEvent {
        #[prost(message, tag = "1")]
        Start(WatchStart),
        #[prost(message, tag = "2")]
        Filesystem(FilesystemEvent),
        #[prost(message, tag = "3")]
        Keepalive(KeepAlive),
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct WatchDirResponse {
        #[prost(oneof = "WatchEvent", tags = "1, 2, 3")]
        #[serde(flatten)]
        pub event: Option<WatchEvent>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct WatcherIdMessage {
        #[prost(string, tag = "1")]
        #[serde(alias = "watcher_id")]
        pub watcher_id: String,
    }

    pub type CreateWatcherResponse = WatcherIdMessage;
    pub type GetWatcherEventsRequest = WatcherIdMessage;
    pub type RemoveWatcherRequest = WatcherIdMessage;

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    #[serde(default)]
    pub struct GetWatcherEventsResponse {
        #[prost(message, repeated, tag = "1")]
        pub events: Vec<FilesystemEvent>,
    }

    #[derive(Clone, PartialEq, ::prost::Message, Serialize, Deserialize)]
    pub struct RemoveWatcherResponse {}
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
    use super::process::*;
    use super::*;
    use prost::Message;

    #[test]
    fn process_event_json_matches_protojson() {
        let ev = EventResponse::new(Event::Data(DataEvent {
            output: Some(Output::Stdout(Bytes::from_static(b"hi\n"))),
        }));
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(s, r#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        let back: EventResponse = serde_json::from_str(&s).unwrap();
        assert_eq!(back, ev);

        let end = EventResponse::new(Event::End(EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: None,
        }));
        let s = serde_json::to_string(&end).unwrap();
        assert_eq!(
            s,
            r#"{"event":{"end":{"exitCode":-1,"exited":false,"status":"signal: killed"}}}"#
        );
    }

    #[test]
    fn selectors_and_enums_parse_leniently() {
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"42"},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(r.process, Some(ProcessSelector::pid(42)));
        assert_eq!(r.signal, Signal::Sigkill as i32);
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"tag":"x"},"signal":15}"#).unwrap();
        assert_eq!(r.process, Some(ProcessSelector::tag("x")));
        assert_eq!(r.signal, 15);
        assert!(serde_json::from_str::<SendSignalRequest>(r#"{"signal":"SIGFOO"}"#).is_err());
    }

    #[test]
    fn snake_case_and_unpadded_base64_accepted() {
        let r: WatchRequest =
            serde_json::from_str(r#"{"path":"/x","include_entry":true,"allowNetworkMounts":true}"#)
                .unwrap();
        assert!(r.include_entry && r.allow_network_mounts);
        let i: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"stdin":"aGk"}}"#).unwrap();
        assert_eq!(
            i.input.and_then(|i| i.input),
            Some(Input::Stdin(Bytes::from_static(b"hi")))
        );
    }

    #[test]
    fn entry_info_int64_is_a_string_and_timestamp_rfc3339() {
        let e = EntryInfo {
            name: "a".into(),
            r#type: FileType::File as i32,
            size: 4096,
            modified_time: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["size"], "4096");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["modifiedTime"], "1970-01-01T00:00:00Z");
        let back: EntryInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn binary_codec_round_trips() {
        let ev = EventResponse::new(Event::Start(StartEvent { pid: 7 }));
        let bytes = ev.encode_to_vec();
        assert_eq!(EventResponse::decode(bytes.as_slice()).unwrap(), ev);
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
