//! vpcd's protocol (vsmartcard's virtualsmartcard, vpcd.c): the card connects to the driver over
//! TCP; every message in either direction is a 2-byte big-endian length and a payload. A 1-byte
//! payload from vpcd is a control message (0 power off, 1 power on, 2 reset, 4 get ATR, which the
//! card answers with its ATR); anything longer is a command APDU, answered with the response
//! APDU. The card is "in the reader" while the connection is up: closing it is a removal.
//!
//! vpcd writes the length and the payload in two writes, so without TCP_NODELAY and
//! TCP_QUICKACK each APDU waits for a delayed ACK (about 40 ms). The card writes each message
//! in one write and sets both options; QUICKACK again right after reading each length (setting
//! it sends the pending ACK at once, which releases vpcd's payload) and after each payload.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cms_card::sim::{CardEvent, VirtualCard};
use zeroize::Zeroizing;

/// vpcd control messages.
mod ctrl {
    pub const OFF: u8 = 0;
    pub const ON: u8 = 1;
    pub const RESET: u8 = 2;
    pub const ATR: u8 = 4;
}

/// Pause between connection attempts while vpcd is not there.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    inserted: bool,
    connected: bool,
    powered: bool,
    /// pcscd powered the card at least once on this connection: it knows the card is there.
    /// (pcscd powers a card down again when no client uses it, so `powered` comes and goes.)
    probed: bool,
    /// A handle on the live connection, so a removal can close it under the serving loop.
    stream: Option<TcpStream>,
}

/// The card's slot as the control socket sees it.
#[derive(Clone)]
pub struct Reader {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Reader {
    pub fn new() -> Self {
        Reader {
            shared: Arc::new((
                Mutex::new(State {
                    inserted: true,
                    ..State::default()
                }),
                Condvar::new(),
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.shared.1.notify_all();
    }

    /// Pulls the card: closes vpcd's connection and waits until the serving loop let go.
    pub fn remove(&self) {
        let mut state = self.lock();
        state.inserted = false;
        if let Some(stream) = state.stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.notify();
        while state.connected {
            state = self.shared.1.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Puts the card back; the serving loop reconnects.
    pub fn insert(&self) {
        self.lock().inserted = true;
        self.notify();
    }

    /// Waits until pcscd has seen the card (powered it once on this connection); false on
    /// timeout.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !(state.inserted && state.probed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .1
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn status(&self) -> String {
        let state = self.lock();
        format!(
            "inserted={} connected={} powered={} ready={}",
            u8::from(state.inserted),
            u8::from(state.connected),
            u8::from(state.powered),
            u8::from(state.probed)
        )
    }

    fn wait_inserted(&self) {
        let mut state = self.lock();
        while !state.inserted {
            state = self.shared.1.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Records power; true the first time on this connection.
    fn set_powered(&self, powered: bool) -> bool {
        let mut state = self.lock();
        state.powered = powered;
        let first = powered && !state.probed;
        state.probed |= powered;
        drop(state);
        self.notify();
        first
    }
}

fn connect(address: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in address.to_socket_addrs()? {
        match TcpStream::connect(addr).and_then(refuse_self_connection) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                socket2::SockRef::from(&stream).set_tcp_quickack(true)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// With nothing listening on a loopback port that is also in the ephemeral range, Linux may pick
/// that very port as the source: TCP "simultaneous open" connects the socket to itself, and the
/// card would wait forever for vpcd (seen in the tests as a card pcscd never powers).
fn refuse_self_connection(stream: TcpStream) -> io::Result<TcpStream> {
    if stream.local_addr()? == stream.peer_addr()? {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connected to itself: nothing listens there",
        ));
    }
    Ok(stream)
}

/// Serves the card forever: connects while the card is inserted, reconnects when vpcd goes
/// away (pcscd restarted) or after a removal and re-insertion.
pub fn serve(address: &str, card: &mut VirtualCard, reader: &Reader) -> anyhow::Result<()> {
    let mut waiting_said = false;
    loop {
        reader.wait_inserted();
        let stream = match connect(address) {
            Ok(stream) => stream,
            Err(error) => {
                if !waiting_said {
                    eprintln!("cms-vcard: waiting for vpcd at {address} ({error})");
                    waiting_said = true;
                }
                std::thread::sleep(RETRY);
                continue;
            }
        };
        waiting_said = false;
        {
            let mut state = reader.lock();
            if !state.inserted {
                // Pulled while connecting.
                continue;
            }
            state.stream = Some(stream.try_clone()?);
            state.connected = true;
        }
        reader.notify();
        eprintln!("cms-vcard: connected to vpcd at {address}");
        let outcome = session(stream, card, reader);
        let removed = {
            let mut state = reader.lock();
            state.connected = false;
            state.powered = false;
            state.probed = false;
            state.stream = None;
            !state.inserted
        };
        reader.notify();
        // Either way the card lost power: its RAM is gone.
        card.event(if removed {
            CardEvent::Removed
        } else {
            CardEvent::PowerOff
        });
        match outcome {
            _ if removed => eprintln!("cms-vcard: card removed"),
            Ok(()) => eprintln!("cms-vcard: vpcd closed the connection; reconnecting"),
            Err(error) => eprintln!("cms-vcard: vpcd connection lost ({error}); reconnecting"),
        }
    }
}

/// One connection: messages until vpcd (or a removal) closes it.
fn session(mut stream: TcpStream, card: &mut VirtualCard, reader: &Reader) -> io::Result<()> {
    let quickack = socket2::SockRef::from(&stream).try_clone()?;
    let mut length = [0u8; 2];
    loop {
        match stream.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        // vpcd writes the length, then the payload; Nagle holds the payload on its side until
        // the length is ACKed. Setting QUICKACK here sends that ACK now instead of after the
        // delayed-ACK timer (Linux also clears QUICKACK after a while, so it is set every time).
        quickack.set_tcp_quickack(true)?;
        let len = usize::from(u16::from_be_bytes(length));
        let mut message = Zeroizing::new(vec![0u8; len]);
        stream.read_exact(&mut message)?;
        quickack.set_tcp_quickack(true)?;
        match &message[..] {
            [] => {}
            [ctrl::ATR] => send(&mut stream, card.atr())?,
            [ctrl::ON] => {
                card.event(CardEvent::PowerOn);
                if reader.set_powered(true) {
                    eprintln!("cms-vcard: pcscd powered the card");
                }
            }
            [ctrl::OFF] => {
                card.event(CardEvent::PowerOff);
                let _ = reader.set_powered(false);
            }
            [ctrl::RESET] => card.event(CardEvent::Reset),
            [_] => {} // unknown control message: ignored, as vsmartcard's vicc does
            apdu => {
                let answer = card.transmit(apdu);
                send(&mut stream, &answer)?;
            }
        }
    }
}

/// Writes length and payload in one write.
fn send(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too long"))?;
    let mut frame = Zeroizing::new(Vec::with_capacity(payload.len() + 2));
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    use cms_card::sim::state::{self, CardState, Profile};
    use cms_cardcrypto::{KeyAlgorithm, SecretKey};

    fn piv_card() -> VirtualCard {
        VirtualCard::new(CardState {
            profile: Profile::Piv,
            card_id: vec![7; 16],
            serial: 99,
            admin_key: SecretKey::new(KeyAlgorithm::Tdes3Key, &state::DEFAULT_MANAGEMENT_KEY)
                .expect("key"),
            admin_tries: 5,
            pin: Zeroizing::new(b"123456".to_vec()),
            pin_tries: 3,
            puk: Some(Zeroizing::new(b"12345678".to_vec())),
            puk_tries: 5,
            objects: Default::default(),
        })
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).expect("length");
        let mut payload = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut payload).expect("payload");
        payload
    }

    /// vpcd writes each APDU as two writes (length, then payload) with Nagle on: the payload
    /// waits until the length is ACKed. Unless the card ACKs at once, every APDU costs a
    /// delayed-ACK timeout (40 ms or more on Linux).
    #[test]
    fn apdus_written_in_two_pieces_are_answered_without_a_delayed_ack() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let reader = Reader::new();
        std::thread::spawn(move || {
            let mut card = piv_card();
            let _ = serve(&address, &mut card, &reader);
        });
        let (mut vpcd, _) = listener.accept().expect("card connects");
        vpcd.set_nodelay(false).expect("Nagle on, as vpcd has it");
        let get_version = [0x00, 0xFD, 0x00, 0x00, 0x00];
        let rounds = 40;
        let start = Instant::now();
        for _ in 0..rounds {
            vpcd.write_all(&(get_version.len() as u16).to_be_bytes())
                .expect("write");
            vpcd.write_all(&get_version).expect("write");
            assert_eq!(read_frame(&mut vpcd), [5, 4, 3, 0x90, 0x00]);
        }
        let per_apdu = start.elapsed() / rounds;
        assert!(
            per_apdu < Duration::from_millis(10),
            "{per_apdu:?} per APDU: the card delays its ACKs"
        );
    }

    /// A socket bound to the port it connects to opens to itself (TCP simultaneous open): that
    /// is not vpcd, and the card must not wait on it.
    #[test]
    fn a_connection_to_itself_is_refused() {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_reuse_address(true).expect("reuse");
        socket.bind(&address.into()).expect("bind");
        socket.connect(&address.into()).expect("simultaneous open");
        let stream: TcpStream = socket.into();
        assert_eq!(
            stream.local_addr().expect("local"),
            stream.peer_addr().expect("peer")
        );
        let err = refuse_self_connection(stream).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// pcscd restarted: vpcd's connection goes away without a removal; the card reconnects and
    /// its RAM (here: the PIN verification) is gone.
    #[test]
    fn reconnects_when_vpcd_goes_away() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let reader = Reader::new();
        let serving = reader.clone();
        std::thread::spawn(move || {
            let mut card = piv_card();
            let _ = serve(&address, &mut card, &serving);
        });
        let verify = [
            0, 0x20, 0, 0x80, 8, b'1', b'2', b'3', b'4', b'5', b'6', 0xFF, 0xFF,
        ];
        let (mut vpcd, _) = listener.accept().expect("card connects");
        vpcd.write_all(&frame(&verify)).expect("write");
        assert_eq!(read_frame(&mut vpcd), [0x90, 0x00]);
        vpcd.write_all(&frame(&[0, 0x20, 0, 0x80])).expect("write");
        assert_eq!(read_frame(&mut vpcd), [0x90, 0x00]);
        drop(vpcd);
        let (mut vpcd, _) = listener.accept().expect("card reconnects");
        vpcd.write_all(&frame(&[0, 0x20, 0, 0x80])).expect("write");
        assert_eq!(read_frame(&mut vpcd), [0x63, 0xC3], "verification survived");
        assert!(reader.status().starts_with("inserted=1 connected=1"));
    }

    /// Plays vpcd: ATR, power on, an APDU sent as vpcd sends it (length and payload in two
    /// writes), then a removal through the control path and a reconnection.
    #[test]
    fn speaks_vpcd_and_reconnects_after_a_removal() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let reader = Reader::new();
        let serving = reader.clone();
        std::thread::spawn(move || {
            let mut card = piv_card();
            let _ = serve(&address, &mut card, &serving);
        });
        let (mut vpcd, _) = listener.accept().expect("card connects");
        vpcd.write_all(&frame(&[ctrl::ATR])).expect("write");
        assert_eq!(read_frame(&mut vpcd), cms_card::sim::ATR_PIV);
        vpcd.write_all(&frame(&[ctrl::ON])).expect("write");
        assert!(reader.wait_ready(Duration::from_secs(5)));
        let get_version = [0x00, 0xFD, 0x00, 0x00, 0x00];
        vpcd.write_all(&(get_version.len() as u16).to_be_bytes())
            .expect("write");
        vpcd.write_all(&get_version).expect("write");
        assert_eq!(read_frame(&mut vpcd), [5, 4, 3, 0x90, 0x00]);

        reader.remove();
        assert_eq!(reader.status(), "inserted=0 connected=0 powered=0 ready=0");
        let mut rest = Vec::new();
        assert_eq!(vpcd.read_to_end(&mut rest).expect("eof"), 0);

        reader.insert();
        let (mut vpcd, _) = listener.accept().expect("card reconnects");
        vpcd.write_all(&frame(&[ctrl::ON])).expect("write");
        assert!(reader.wait_ready(Duration::from_secs(5)));
        assert_eq!(reader.status(), "inserted=1 connected=1 powered=1 ready=1");
    }
}
