//! A small QMP client: typed commands over the VM's Unix socket.

use super::QemuError;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The QMP commands Wrenn uses.
#[derive(Clone, Debug, PartialEq)]
pub enum QmpCommand {
    QueryStatus,
    Stop,
    Cont,
    Quit,
    SystemPowerdown,
    /// `migrate-set-capabilities` with `(name, state)` pairs.
    MigrateSetCapabilities(Vec<(String, bool)>),
    Migrate {
        uri: String,
    },
    MigrateIncoming {
        uri: String,
    },
    QueryMigrate,
    /// `migrate-set-parameters` with a bandwidth limit in bytes per second.
    MigrateSetMaxBandwidth(u64),
}

impl QmpCommand {
    pub fn name(&self) -> &'static str {
        match self {
            QmpCommand::QueryStatus => "query-status",
            QmpCommand::Stop => "stop",
            QmpCommand::Cont => "cont",
            QmpCommand::Quit => "quit",
            QmpCommand::SystemPowerdown => "system_powerdown",
            QmpCommand::MigrateSetCapabilities(_) => "migrate-set-capabilities",
            QmpCommand::Migrate { .. } => "migrate",
            QmpCommand::MigrateIncoming { .. } => "migrate-incoming",
            QmpCommand::QueryMigrate => "query-migrate",
            QmpCommand::MigrateSetMaxBandwidth(_) => "migrate-set-parameters",
        }
    }

    pub fn to_json(&self) -> Value {
        let args = match self {
            QmpCommand::MigrateSetCapabilities(caps) => Some(json!({
                "capabilities": caps.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect::<Vec<_>>()
            })),
            QmpCommand::Migrate { uri } | QmpCommand::MigrateIncoming { uri } => {
                Some(json!({ "uri": uri }))
            }
            _ => None,
        };
        match args {
            Some(a) => json!({ "execute": self.name(), "arguments": a }),
            None => json!({ "execute": self.name() }),
        }
    }
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QemuError> {
        let io = |source| QemuError::QmpIo {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.send_raw(&json!({ "execute": "qmp_capabilities" }))
            .await?;
        qmp.read_return("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| QemuError::QmpIo {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QemuError::QmpClosed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line)
            .map_err(|e| QemuError::QmpProtocol(format!("bad QMP message {line:?}: {e}")))
    }

    async fn send_raw(&mut self, v: &Value) -> Result<(), QemuError> {
        let mut bytes = v.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|source| QemuError::QmpIo {
                path: self.path.clone(),
                source,
            })
    }

    async fn read_return(&mut self, command: &str) -> Result<Value, QemuError> {
        loop {
            let msg = self.read_message().await?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(QemuError::QmpCommand {
                    command: command.to_string(),
                    class: err
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                });
            }
            // Asynchronous events interleave with replies; they are not ours to handle here.
        }
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`, the descriptor travelling
    /// as SCM_RIGHTS with the command), for URIs such as `fd:name`.
    pub async fn pass_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QemuError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut bytes = json!({ "execute": "getfd", "arguments": { "fdname": name } })
            .to_string()
            .into_bytes();
        bytes.push(b'\n');
        let io = |source| QemuError::QmpIo {
            path: self.path.clone(),
            source,
        };
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        let mut sent = 0;
        while sent < bytes.len() {
            stream.writable().await.map_err(io)?;
            let chunk = [std::io::IoSlice::new(&bytes[sent..])];
            // The descriptor goes with the first byte; later chunks carry none.
            let cmsgs: &[ControlMessage] = if sent == 0 {
                &[ControlMessage::ScmRights(&fds)]
            } else {
                &[]
            };
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &chunk,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io(e)),
            }
        }
        self.read_return("getfd").await.map(|_| ())
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, cmd: &QmpCommand) -> Result<Value, QemuError> {
        self.send_raw(&cmd.to_json()).await?;
        self.read_return(cmd.name()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_serialize() {
        assert_eq!(QmpCommand::Stop.to_json(), json!({"execute": "stop"}));
        assert_eq!(
            QmpCommand::Migrate {
                uri: "exec:cat > /x".into()
            }
            .to_json(),
            json!({"execute": "migrate", "arguments": {"uri": "exec:cat > /x"}})
        );
        assert_eq!(
            QmpCommand::MigrateSetCapabilities(vec![("x-ignore-shared".into(), true)]).to_json(),
            json!({"execute": "migrate-set-capabilities",
                   "arguments": {"capabilities": [{"capability": "x-ignore-shared", "state": true}]}})
        );
    }

    #[tokio::test]
    async fn talks_to_a_qmp_peer() {
        let dir = std::env::temp_dir().join(format!("wrenn-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .await
                .unwrap();
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let st = qmp.execute(&QmpCommand::QueryStatus).await.unwrap();
        assert_eq!(st["status"], "running");
        let err = qmp.execute(&QmpCommand::Cont).await.unwrap_err();
        assert!(
            matches!(err, QemuError::QmpCommand { ref desc, .. } if desc == "nope"),
            "{err}"
        );
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
