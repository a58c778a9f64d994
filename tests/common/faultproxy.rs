//! A small HTTP proxy in front of a real registry that breaks requests on
//! demand: the faults a registry, a CDN or a network shows a fetcher. One
//! request per connection (`Connection: close`), so every fault is exact.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass requests through untouched.
    None,
    /// Close the connection without answering.
    Drop,
    /// Accept and never answer (until the client gives up).
    Stall,
    /// Answer `500 Internal Server Error`.
    Status500,
    /// Strip `Range`, so the registry answers `200` with the whole blob.
    Full200,
    /// Flip one byte in the middle of the body.
    FlipByte,
    /// Send the headers and half the body, then close.
    Truncate,
    /// Wait this many milliseconds, then pass through (not a failure).
    Delay(u64),
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// How many more requests get the fault; `None` is every one.
    remaining: Option<u32>,
    /// Blob GETs seen (each try counts).
    blob_gets: u64,
    faulted: u64,
    /// Bearer tokens: each is good for this many requests (`None`: no auth).
    token_uses: Option<u32>,
    tokens_issued: u64,
    live_token: Option<(String, u32)>,
}

pub struct FaultProxy {
    pub addr: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr); // wake the accept loop
    }
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, up, me) = (state.clone(), stop.clone(), upstream.to_string(), addr.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (st, sp, up, me) = (st.clone(), sp.clone(), up.clone(), me.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &st, &sp, &up, &me);
                });
            }
        });
        FaultProxy { addr, state, stop }
    }

    /// Apply `fault` to the next `times` blob GETs (`None`: until changed).
    pub fn set(&self, fault: Fault, times: Option<u32>) {
        let mut st = self.state.lock().unwrap();
        st.fault = Some(fault);
        st.remaining = times;
    }

    /// Demand bearer tokens (from this proxy's `/token`), each good for `uses` requests.
    pub fn require_tokens(&self, uses: u32) {
        self.state.lock().unwrap().token_uses = Some(uses);
    }

    pub fn blob_gets(&self) -> u64 {
        self.state.lock().unwrap().blob_gets
    }
    pub fn faulted(&self) -> u64 {
        self.state.lock().unwrap().faulted
    }
    pub fn tokens_issued(&self) -> u64 {
        self.state.lock().unwrap().tokens_issued
    }
}

fn read_head(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

fn respond(conn: &mut TcpStream, status: &str, headers: &str, body: &[u8]) -> std::io::Result<()> {
    write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n", body.len())?;
    conn.write_all(body)
}

fn serve(
    mut conn: TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    upstream: &str,
    me: &str,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn) else { return Ok(()) };
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let auth = headers
        .iter()
        .find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("authorization")).map(|(_, v)| v.trim()))
        .unwrap_or("")
        .to_string();

    // Token auth: issue tokens, and check them on every other request.
    {
        let mut st = state.lock().unwrap();
        if let Some(uses) = st.token_uses {
            if path.starts_with("/token") {
                st.tokens_issued += 1;
                let t = format!("t{}", st.tokens_issued);
                st.live_token = Some((t.clone(), uses));
                drop(st);
                return respond(
                    &mut conn,
                    "200 OK",
                    "Content-Type: application/json\r\n",
                    format!("{{\"token\":\"{t}\"}}").as_bytes(),
                );
            }
            let ok = match &mut st.live_token {
                Some((t, left)) if *left > 0 && auth == format!("Bearer {t}") => {
                    *left -= 1;
                    true
                }
                _ => false,
            };
            if !ok {
                drop(st);
                let challenge =
                    format!("WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"faultproxy\"\r\n");
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    &challenge,
                    b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                );
            }
        }
    }

    let is_blob_get = request_line.starts_with("GET ") && path.contains("/blobs/");
    let fault = {
        let mut st = state.lock().unwrap();
        if is_blob_get {
            st.blob_gets += 1;
        }
        let f = st.fault.filter(|_| is_blob_get && st.remaining != Some(0)).unwrap_or(Fault::None);
        if !matches!(f, Fault::None | Fault::Delay(_)) {
            st.faulted += 1;
            if let Some(r) = st.remaining.as_mut() {
                *r -= 1;
            }
        }
        f
    };
    match fault {
        Fault::Drop => {
            let _ = conn.shutdown(Shutdown::Both);
            return Ok(());
        }
        Fault::Stall => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                // The client gave up: a read returns 0 (closed) or an error.
                conn.set_nonblocking(true)?;
                let mut b = [0u8; 1];
                match conn.read(&mut b) {
                    Ok(0) => return Ok(()),
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Ok(()),
                    _ => {}
                }
            }
            return Ok(());
        }
        Fault::Status500 => return respond(&mut conn, "500 Internal Server Error", "", b"injected"),
        Fault::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
        _ => {}
    }

    // Forward, one request per connection.
    let mut out = format!("{request_line}\r\n");
    for h in &headers {
        let name = h.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if name == "connection" || name == "authorization" || (fault == Fault::Full200 && name == "range") {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(out.as_bytes())?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(resp.len());
    match fault {
        Fault::FlipByte if resp.len() > split => {
            let mid = split + (resp.len() - split) / 2;
            resp[mid] ^= 0xff;
            conn.write_all(&resp)?;
        }
        Fault::Truncate if resp.len() > split + 1 => {
            let cut = split + (resp.len() - split) / 2;
            conn.write_all(&resp[..cut])?;
            conn.shutdown(Shutdown::Both)?;
        }
        _ => conn.write_all(&resp)?,
    }
    Ok(())
}
