//! supervisord program states over its XML-RPC interface (`supervisor.getAllProcessInfo`), on
//! a unix socket or HTTP, with optional basic auth: each program's state as a state-set, pid,
//! uptime and exit status. The answer is parsed by a pure function; no other method is called.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use quick_xml::events::Event;
use quick_xml::Reader;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::collector::{CollectError, Collector, CollectorKind, ScrapeContext, Target};
use crate::config::{
    read_secret_file, HumanDuration, Located, Problem, Secret, SectionContext, TargetId,
};
use crate::snapshot::SampleBuffer;

/// The `supervisord` collector, configured by the `supervisord:` section.
pub const KIND: CollectorKind = CollectorKind {
    name: "supervisord",
    section: "supervisord",
    always_on: false,
    configure,
};

/// supervisord's process states (`supervisor/states.py`), the label values of the state-set.
pub const STATES: &[&str] = &[
    "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN",
];

/// An answer larger than this is not supervisord's: a few hundred programs are ~200 KB.
const MAX_RESPONSE: u64 = 8 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisord {
    name: String,
    cluster: Option<String>,
    timeout: Option<HumanDuration>,
    /// `unix:///var/run/supervisor.sock` or `http://127.0.0.1:9001/RPC2`.
    url: String,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

/// Where supervisord listens.
#[derive(Clone, Debug, PartialEq)]
enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: String, path: String },
}

fn parse_url(url: &str) -> Result<Endpoint, String> {
    if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(
                "a unix socket URL needs an absolute path, like unix:///var/run/supervisor.sock"
                    .into(),
            );
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    let u = url::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    if u.scheme() != "http" {
        return Err(format!(
            "unsupported scheme `{}`: use unix:// or http://",
            u.scheme()
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "credentials do not belong in the URL: use `username` and `password_file`".into(),
        );
    }
    let host = u.host_str().ok_or("the URL has no host")?;
    let port = u.port().unwrap_or(9001);
    let path = match u.path() {
        "" | "/" => "/RPC2".to_owned(),
        p => p.to_owned(),
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(Endpoint::Tcp {
        addr: format!("{host}:{port}"),
        path,
    })
}

fn configure(at: Located, ctx: &SectionContext, problems: &mut Vec<Problem>) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for (raw, item) in at.parse_list::<RawSupervisord>(problems) {
        let before = problems.len();
        let id = TargetId::check(raw.name, raw.cluster, raw.timeout, &item, problems);
        let endpoint = parse_url(&raw.url)
            .map_err(|e| problems.push(item.problem("url", e)))
            .ok();
        let auth = match (raw.username, raw.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => match read_secret_file(&ctx.resolve(&file)) {
                Ok(password) => Some((user, password)),
                Err(e) => {
                    problems.push(item.problem("password_file", e));
                    None
                }
            },
            _ => {
                problems.push(item.problem(
                    "username",
                    "basic auth needs both `username` and `password_file`",
                ));
                None
            }
        };
        let Some(endpoint) = endpoint else { continue };
        if problems.len() > before {
            continue;
        }
        out.push(Target::new(
            &KIND,
            id,
            SupervisordCollector { endpoint, auth },
        ));
    }
    out
}

/// One supervisord instance.
pub struct SupervisordCollector {
    endpoint: Endpoint,
    auth: Option<(String, Secret)>,
}

const REQUEST_BODY: &str = "<?xml version=\"1.0\"?>\n<methodCall><methodName>supervisor.getAllProcessInfo</methodName><params></params></methodCall>\n";

impl SupervisordCollector {
    async fn call(&self) -> Result<Vec<u8>, CollectError> {
        let (host, path) = match &self.endpoint {
            Endpoint::Unix(_) => ("localhost", "/RPC2"),
            Endpoint::Tcp { addr, path } => (addr.as_str(), path.as_str()),
        };
        let mut request = format!(
            "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n",
            REQUEST_BODY.len()
        );
        if let Some((user, password)) = &self.auth {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", password.expose()));
            request.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(REQUEST_BODY);
        let raw = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| CollectError::Connect(format!("{}: {e}", p.display())))?;
                exchange(s, request.as_bytes()).await?
            }
            Endpoint::Tcp { addr, .. } => {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| CollectError::Connect(format!("{addr}: {e}")))?;
                exchange(s, request.as_bytes()).await?
            }
        };
        http_body(&raw)
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> Result<Vec<u8>, CollectError> {
    s.write_all(request)
        .await
        .map_err(|e| CollectError::Connect(format!("sending the request: {e}")))?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| CollectError::Protocol(format!("reading the answer: {e}")))?;
    Ok(raw)
}

/// The body of an HTTP/1.0 answer, or the error its status means.
fn http_body(raw: &[u8]) -> Result<Vec<u8>, CollectError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| CollectError::Protocol("no HTTP header in the answer".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CollectError::Protocol("no HTTP status in the answer".into()))?;
    match status {
        200 => Ok(raw[split + 4..].to_vec()),
        401 => Err(CollectError::Auth("supervisord answered 401".into())),
        403 => Err(CollectError::Permission("supervisord answered 403".into())),
        s => Err(CollectError::Query(format!(
            "supervisord answered HTTP {s}"
        ))),
    }
}

/// An XML-RPC value, as much of the type system as supervisord uses.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(i64),
    Str(String),
    Bool(bool),
    Double(f64),
    Array(Vec<Value>),
    Struct(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Int(i) => Some(*i),
            Value::Double(d) => Some(*d as i64),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One program as `getAllProcessInfo` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramInfo {
    /// `group:name` for a process of a group, else the name (as supervisorctl shows it).
    pub program: String,
    /// One of [`STATES`]; anything else becomes `UNKNOWN`.
    pub state: &'static str,
    /// 0 when not running.
    pub pid: i64,
    /// Seconds since it started, when running.
    pub uptime: i64,
    /// Exit status of its last exit.
    pub exit_status: i64,
}

type XmlReader<'a> = Reader<&'a [u8]>;

fn xml_err(e: impl std::fmt::Display) -> String {
    format!("bad XML-RPC answer: {e}")
}

/// Text content up to the end tag, entity references resolved.
fn read_text(r: &mut XmlReader) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match r.read_event().map_err(xml_err)? {
            Event::Text(t) => text.push_str(&t.decode().map_err(xml_err)?),
            Event::CData(t) => text.push_str(&String::from_utf8_lossy(&t)),
            Event::GeneralRef(g) => {
                if let Some(c) = g.resolve_char_ref().map_err(xml_err)? {
                    text.push(c);
                } else {
                    let name = g.decode().map_err(xml_err)?;
                    let c = quick_xml::escape::resolve_predefined_entity(&name)
                        .ok_or_else(|| xml_err(format!("unknown entity &{name};")))?;
                    text.push_str(c);
                }
            }
            Event::End(_) => return Ok(text),
            Event::Eof => return Err(xml_err("unexpected end")),
            Event::Start(s) => {
                return Err(xml_err(format!(
                    "unexpected <{}> in text",
                    String::from_utf8_lossy(s.name().as_ref())
                )))
            }
            _ => {}
        }
    }
}

/// Parses the content of a `<value>` whose start tag was just read, through its end tag.
fn read_value(r: &mut XmlReader) -> Result<Value, String> {
    let mut text = String::new();
    let mut typed = None;
    loop {
        match r.read_event().map_err(xml_err)? {
            Event::Text(t) => text.push_str(&t.decode().map_err(xml_err)?),
            Event::GeneralRef(g) => {
                let name = g.decode().map_err(xml_err)?;
                text.push_str(quick_xml::escape::resolve_predefined_entity(&name).unwrap_or(""));
            }
            Event::Empty(e) => {
                typed = Some(match e.name().as_ref() {
                    b"string" => Value::Str(String::new()),
                    b"array" => Value::Array(Vec::new()),
                    b"struct" => Value::Struct(Vec::new()),
                    other => {
                        return Err(xml_err(format!(
                            "empty <{}>",
                            String::from_utf8_lossy(other)
                        )))
                    }
                })
            }
            Event::Start(e) => {
                let v = match e.name().as_ref() {
                    b"int" | b"i4" | b"i8" => {
                        let t = read_text(r)?;
                        Value::Int(
                            t.trim()
                                .parse()
                                .map_err(|_| xml_err(format!("bad int `{t}`")))?,
                        )
                    }
                    b"boolean" => Value::Bool(read_text(r)?.trim() == "1"),
                    b"double" => {
                        let t = read_text(r)?;
                        Value::Double(
                            t.trim()
                                .parse()
                                .map_err(|_| xml_err(format!("bad double `{t}`")))?,
                        )
                    }
                    b"string" => Value::Str(read_text(r)?),
                    b"array" => read_array(r)?,
                    b"struct" => read_struct(r)?,
                    other => {
                        return Err(xml_err(format!(
                            "unsupported type <{}>",
                            String::from_utf8_lossy(other)
                        )))
                    }
                };
                typed = Some(v);
            }
            Event::End(_) => return Ok(typed.unwrap_or(Value::Str(text))),
            Event::Eof => return Err(xml_err("unexpected end")),
            _ => {}
        }
    }
}

fn read_array(r: &mut XmlReader) -> Result<Value, String> {
    let mut items = Vec::new();
    loop {
        match r.read_event().map_err(xml_err)? {
            Event::Start(e) if e.name().as_ref() == b"value" => items.push(read_value(r)?),
            Event::Empty(e) if e.name().as_ref() == b"value" => {
                items.push(Value::Str(String::new()))
            }
            Event::End(e) if e.name().as_ref() == b"array" => return Ok(Value::Array(items)),
            Event::Eof => return Err(xml_err("unexpected end in <array>")),
            _ => {}
        }
    }
}

fn read_struct(r: &mut XmlReader) -> Result<Value, String> {
    let mut members = Vec::new();
    let mut name = None;
    loop {
        match r.read_event().map_err(xml_err)? {
            Event::Start(e) if e.name().as_ref() == b"name" => name = Some(read_text(r)?),
            Event::Start(e) if e.name().as_ref() == b"value" => {
                let v = read_value(r)?;
                members.push((name.take().unwrap_or_default(), v));
            }
            Event::End(e) if e.name().as_ref() == b"struct" => return Ok(Value::Struct(members)),
            Event::Eof => return Err(xml_err("unexpected end in <struct>")),
            _ => {}
        }
    }
}

/// Why an answer could not be used.
#[derive(Debug, PartialEq)]
pub enum RpcError {
    /// supervisord answered with an XML-RPC fault.
    Fault(i64, String),
    /// The answer was not the expected XML-RPC.
    Malformed(String),
}

/// Parses the answer to `supervisor.getAllProcessInfo`.
pub fn parse_process_info(xml: &[u8]) -> Result<Vec<ProgramInfo>, RpcError> {
    let mut r = Reader::from_reader(xml);
    let mut fault = false;
    let value = loop {
        match r
            .read_event()
            .map_err(|e| RpcError::Malformed(xml_err(e)))?
        {
            Event::Start(e) if e.name().as_ref() == b"fault" => fault = true,
            Event::Start(e) if e.name().as_ref() == b"value" => {
                break read_value(&mut r).map_err(RpcError::Malformed)?
            }
            Event::Eof => return Err(RpcError::Malformed("no value in the answer".into())),
            _ => {}
        }
    };
    if fault {
        return Err(RpcError::Fault(
            value.int("faultCode").unwrap_or(0),
            value.str("faultString").unwrap_or("").to_owned(),
        ));
    }
    let Value::Array(items) = value else {
        return Err(RpcError::Malformed("the answer is not an array".into()));
    };
    items
        .iter()
        .map(|p| {
            let name = p
                .str("name")
                .ok_or_else(|| RpcError::Malformed("a program without a name".into()))?;
            let program = match p.str("group") {
                Some(g) if g != name => format!("{g}:{name}"),
                _ => name.to_owned(),
            };
            let state_name = p.str("statename").unwrap_or("UNKNOWN");
            let state = STATES
                .iter()
                .find(|s| **s == state_name)
                .copied()
                .unwrap_or("UNKNOWN");
            let (start, now) = (p.int("start").unwrap_or(0), p.int("now").unwrap_or(0));
            let uptime = if state == "RUNNING" && start > 0 {
                (now - start).max(0)
            } else {
                0
            };
            Ok(ProgramInfo {
                program,
                state,
                pid: p.int("pid").unwrap_or(0),
                uptime,
                exit_status: p.int("exitstatus").unwrap_or(0),
            })
        })
        .collect()
}

/// The samples of every program in a `getAllProcessInfo` answer.
fn write_programs(programs: &[ProgramInfo], out: &mut SampleBuffer) {
    for p in programs {
        let labels = [("program", p.program.as_str())];
        out.state_set(
            "clusterwatch_supervisord_program_state",
            "State of a supervisord program, as a state-set.",
            &labels,
            "state",
            STATES,
            Some(p.state),
        );
        out.gauge(
            "clusterwatch_supervisord_program_pid",
            "Process id of the program (0 when not running).",
            &labels,
            p.pid as f64,
        );
        out.gauge(
            "clusterwatch_supervisord_program_uptime_seconds",
            "Seconds since the program was started (0 when not running).",
            &labels,
            p.uptime as f64,
        );
        out.gauge(
            "clusterwatch_supervisord_program_exit_status",
            "Exit status of the program's last exit.",
            &labels,
            p.exit_status as f64,
        );
    }
}

#[async_trait]
impl Collector for SupervisordCollector {
    async fn collect(
        &self,
        ctx: &ScrapeContext,
        out: &mut SampleBuffer,
    ) -> Result<(), CollectError> {
        let body = ctx.within(self.call()).await?;
        let programs = parse_process_info(&body).map_err(|e| match e {
            RpcError::Fault(code, _) => CollectError::Query(format!("XML-RPC fault {code}")),
            RpcError::Malformed(m) => CollectError::Protocol(m),
        })?;
        write_programs(&programs, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, value: &str) -> String {
        format!("<member><name>{name}</name><value>{value}</value></member>")
    }

    fn program(name: &str, group: &str, state: &str, pid: i64, start: i64, exit: i64) -> String {
        format!(
            "<value><struct>{}{}{}{}{}{}{}{}</struct></value>",
            member("name", &format!("<string>{name}</string>")),
            member("group", &format!("<string>{group}</string>")),
            member("statename", &format!("<string>{state}</string>")),
            member("state", "<int>20</int>"),
            member("pid", &format!("<int>{pid}</int>")),
            member("start", &format!("<int>{start}</int>")),
            member("now", "<int>1700000100</int>"),
            member("exitstatus", &format!("<int>{exit}</int>")),
        )
    }

    #[test]
    fn parses_programs_groups_and_states() {
        let xml = format!(
            "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><array><data>\n{}\n{}\n{}\n</data></array></value>\n</param>\n</params>\n</methodResponse>\n",
            program("sre-manager", "sre-manager", "RUNNING", 19487, 1700000000, 0),
            program("0", "sre-call-processor", "BACKOFF", 0, 0, 1),
            program("odd &amp; new", "odd &amp; new", "SLEEPING", 0, 0, 0),
        );
        let p = parse_process_info(xml.as_bytes()).unwrap();
        assert_eq!(
            p[0],
            ProgramInfo {
                program: "sre-manager".into(),
                state: "RUNNING",
                pid: 19487,
                uptime: 100,
                exit_status: 0
            }
        );
        assert_eq!(
            (p[1].program.as_str(), p[1].state, p[1].uptime),
            ("sre-call-processor:0", "BACKOFF", 0)
        );
        assert_eq!(
            (p[2].program.as_str(), p[2].state),
            ("odd & new", "UNKNOWN")
        );
    }

    #[test]
    fn a_fault_and_garbage_are_errors() {
        let fault = format!(
            "<methodResponse><fault><value><struct>{}{}</struct></value></fault></methodResponse>",
            member("faultCode", "<int>1</int>"),
            member("faultString", "<string>UNKNOWN_METHOD</string>"),
        );
        assert_eq!(
            parse_process_info(fault.as_bytes()),
            Err(RpcError::Fault(1, "UNKNOWN_METHOD".into()))
        );
        assert!(matches!(
            parse_process_info(b"<html>nope</html>"),
            Err(RpcError::Malformed(_))
        ));
        assert_eq!(
            parse_process_info(b"<methodResponse><params><param><value><array><data/></array></value></param></params></methodResponse>"),
            Ok(vec![])
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("unix:///run/supervisor.sock"),
            Ok(Endpoint::Unix("/run/supervisor.sock".into()))
        );
        assert_eq!(
            parse_url("http://127.0.0.1:9001"),
            Ok(Endpoint::Tcp {
                addr: "127.0.0.1:9001".into(),
                path: "/RPC2".into()
            })
        );
        assert!(parse_url("http://u:p@127.0.0.1:9001/RPC2").is_err());
        assert!(parse_url("unix://relative.sock").is_err());
    }

    #[test]
    fn http_status_maps_to_reasons() {
        assert_eq!(
            http_body(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\n<x/>").unwrap(),
            b"<x/>"
        );
        assert!(matches!(
            http_body(b"HTTP/1.0 401 Unauthorized\r\n\r\n"),
            Err(CollectError::Auth(_))
        ));
    }

    /// Captured from supervisord 4.2.5: a running program, one that crashed until FATAL, and
    /// a stopped program of a group.
    #[test]
    fn golden_exposition_of_captured_process_info() {
        let name = "supervisord-4.2.5-getAllProcessInfo";
        let xml = crate::collector::golden::input(&format!("{name}.xml"));
        let mut out = SampleBuffer::new();
        write_programs(&parse_process_info(xml.as_bytes()).unwrap(), &mut out);
        crate::collector::golden::assert_golden(name, out);
    }
}
