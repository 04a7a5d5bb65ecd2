use super::*;
use crate::modbus::frame::REQUEST_LEN;
use tokio::io::{duplex, DuplexStream};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{tcp, Reader};
use tokio_modbus::Slave;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

const NOTHING: Duration = Duration::from_millis(200);
const ANSWER: Duration = Duration::from_secs(5);

/// Unit 1 with hr:0..3 = 1, 2, 3; unit 2 with hr:0..3 = 10, 20, 30; unit 3 silent.
fn line() -> RtuSim {
    let one = SimDevice::new();
    one.image().hr[..3].copy_from_slice(&[1, 2, 3]);
    let two = SimDevice::new();
    two.image().hr[..3].copy_from_slice(&[10, 20, 30]);
    let three = SimDevice::new();
    three.faults().silent.store(true, Ordering::Relaxed);
    RtuSim::new()
        .with_unit(1, one)
        .with_unit(2, two)
        .with_unit(3, three)
}

fn read_request(unit: u8, area: Area, start: u16, count: u16) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_read(unit, area, start, count, &mut out);
    out
}

fn registers_answer(unit: u8, regs: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_registers(unit, 3, regs, &mut out);
    out
}

fn exception_answer(unit: u8, function: u8, code: u8) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_exception(unit, function, code, &mut out);
    out
}

/// A fresh link path in the temp directory, unique per test and process.
fn link_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rtu-sim-{}-{test}", std::process::id()))
}

fn open_port(path: &Path) -> SerialStream {
    tokio_serial::new(path.to_string_lossy(), 19_200)
        .open_native_async()
        .expect("open the pty link as a serial port")
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) {
    io.write_all(bytes).await.expect("write request");
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: &[u8],
    len: usize,
) -> Vec<u8> {
    io.write_all(request).await.expect("write request");
    let mut answer = vec![0; len];
    timeout(ANSWER, io.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("read answer");
    answer
}

async fn assert_silence<S: AsyncRead + Unpin>(io: &mut S) {
    let mut byte = [0u8; 1];
    if let Ok(read) = timeout(NOTHING, io.read(&mut byte)).await {
        panic!("expected no answer, got {read:?} ({byte:?})");
    }
}

/// Everything that arrives until the line has been quiet for 100 ms.
async fn read_burst<S: AsyncRead + Unpin>(io: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(read) = timeout(Duration::from_millis(100), io.read(&mut buf)).await {
        let n = read.expect("read");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn serve_duplex(sim: &RtuSim) -> DuplexStream {
    let (master, slave) = duplex(4096);
    let sim = sim.clone();
    tokio::spawn(async move { sim.serve_stream(slave).await });
    master
}

#[tokio::test]
async fn pty_link_answers_each_unit_and_ignores_unknown_and_silent_ones() {
    let sim = line();
    let link = link_path("units");
    let pty = sim.serve_pty(&link).expect("serve pty");
    assert_eq!(pty.path(), link);
    assert!(fs::read_link(&link)
        .expect("a symlink")
        .starts_with("/dev/pts"));
    let mut port = open_port(&link);

    let hr = Area::HoldingRegister;
    let answer = exchange(&mut port, &read_request(1, hr, 0, 3), 11).await;
    assert_eq!(answer, registers_answer(1, &[1, 2, 3]));
    let answer = exchange(&mut port, &read_request(2, hr, 1, 2), 9).await;
    assert_eq!(answer, registers_answer(2, &[20, 30]));

    send(&mut port, &read_request(9, hr, 0, 1)).await;
    assert_silence(&mut port).await;
    send(&mut port, &read_request(3, hr, 0, 1)).await;
    assert_silence(&mut port).await;

    let device = |unit| sim.device(unit).expect("unit").requests();
    assert_eq!((device(1), device(2), device(3)), (1, 1, 1));
    assert!(sim.device(9).is_none());
    assert_eq!(sim.faults().answers(), 2);
    drop(pty);
    assert!(fs::symlink_metadata(&link).is_err(), "link removed on drop");
}

#[tokio::test]
async fn garbage_before_a_request_is_skipped() {
    let sim = line();
    let link = link_path("garbage");
    let _pty = sim.serve_pty(&link).expect("serve pty");
    let mut port = open_port(&link);
    let mut bytes = vec![0xFF, 0x00, 0x42];
    bytes.extend_from_slice(&read_request(1, Area::HoldingRegister, 0, 2));
    let answer = exchange(&mut port, &bytes, 9).await;
    assert_eq!(answer, registers_answer(1, &[1, 2]));
    assert_eq!(sim.faults().bad_requests(), 3);
}

#[tokio::test]
async fn emulated_line_takes_the_wire_time_of_a_transaction() {
    let sim = line().emulate_line(19_200, 11);
    let timing = sim.timing().expect("timing");
    let link = link_path("timing");
    let _pty = sim.serve_pty(&link).expect("serve pty");
    let mut port = open_port(&link);
    let started = std::time::Instant::now();
    let answer = exchange(
        &mut port,
        &read_request(2, Area::HoldingRegister, 0, 125),
        255,
    )
    .await;
    let elapsed = started.elapsed();
    assert!(frame::crc_ok(&answer));
    assert_eq!(&answer[..5], &[2, 3, 250, 0, 10]);
    let floor = timing.chars(REQUEST_LEN + 255) + timing.t35;
    assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
}

#[tokio::test]
async fn the_line_survives_the_port_being_closed_and_reopened() {
    let sim = line();
    let link = link_path("reopen");
    let _pty = sim.serve_pty(&link).expect("serve pty");
    let request = read_request(1, Area::HoldingRegister, 2, 1);
    for _ in 0..3 {
        let mut port = open_port(&link);
        assert_eq!(
            exchange(&mut port, &request, 7).await,
            registers_answer(1, &[3])
        );
    }
}

#[tokio::test]
async fn unplug_fails_the_open_port_and_replug_brings_the_line_back() {
    let sim = line();
    let link = link_path("replug");
    let mut pty = sim.serve_pty(&link).expect("serve pty");
    let request = read_request(2, Area::HoldingRegister, 0, 1);
    let mut port = open_port(&link);
    assert_eq!(
        exchange(&mut port, &request, 7).await,
        registers_answer(2, &[10])
    );

    pty.unplug();
    assert!(fs::symlink_metadata(&link).is_err(), "link removed");
    assert!(pty.tty().is_none());
    let mut buf = [0u8; 8];
    match timeout(ANSWER, AsyncReadExt::read(&mut port, &mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        other => panic!("the open port should fail after unplug: {other:?}"),
    }
    drop(port);

    pty.replug().expect("replug");
    assert!(pty.tty().is_some());
    let mut port = open_port(&link);
    assert_eq!(
        exchange(&mut port, &request, 7).await,
        registers_answer(2, &[10])
    );
    pty.stop();
    assert!(fs::symlink_metadata(&link).is_err(), "link removed on stop");
}

#[tokio::test]
async fn rtu_over_tcp_answers_like_the_serial_line() {
    let sim = line();
    let server = sim
        .serve_tcp("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve tcp");
    let mut conn = TcpStream::connect(server.addr()).await.expect("connect");
    let hr = Area::HoldingRegister;
    let answer = exchange(&mut conn, &read_request(1, hr, 0, 3), 11).await;
    assert_eq!(answer, registers_answer(1, &[1, 2, 3]));
    let answer = exchange(&mut conn, &read_request(2, hr, 0, 3), 11).await;
    assert_eq!(answer, registers_answer(2, &[10, 20, 30]));
    conn.write_all(&read_request(9, hr, 0, 1))
        .await
        .expect("write");
    assert_silence(&mut conn).await;

    // A second connection to the same converter reaches the same line.
    let mut other = TcpStream::connect(server.addr()).await.expect("connect");
    let answer = exchange(&mut other, &read_request(1, hr, 1, 1), 7).await;
    assert_eq!(answer, registers_answer(1, &[2]));
    assert_eq!(
        sim.device(1)
            .expect("unit")
            .faults()
            .connections
            .load(Ordering::Relaxed),
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn modbus_tcp_units_are_dispatched_by_unit_id() {
    let sim = line();
    let units = [1, 2, 3]
        .map(|u| (u, sim.device(u).expect("unit")))
        .to_vec();
    let server = super::super::modbus::serve_units(units, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve units");

    let mut one = tcp::connect_slave(server.addr(), Slave(1))
        .await
        .expect("connect");
    let regs = one
        .read_holding_registers(0, 3)
        .await
        .expect("io")
        .expect("regs");
    assert_eq!(regs, [1, 2, 3]);
    let mut two = tcp::connect_slave(server.addr(), Slave(2))
        .await
        .expect("connect");
    let regs = two
        .read_holding_registers(0, 3)
        .await
        .expect("io")
        .expect("regs");
    assert_eq!(regs, [10, 20, 30]);
    let mut unknown = tcp::connect_slave(server.addr(), Slave(9))
        .await
        .expect("connect");
    let answer = unknown.read_holding_registers(0, 1).await.expect("io");
    assert_eq!(answer, Err(ExceptionCode::GatewayTargetDevice));
    let mut silent = tcp::connect_slave(server.addr(), Slave(3))
        .await
        .expect("connect");
    assert!(timeout(NOTHING, silent.read_holding_registers(0, 1))
        .await
        .is_err());
    assert_eq!(sim.device(3).expect("unit").requests(), 1);
    server.stop().await;
}

#[tokio::test]
async fn exceptions_follow_the_image_and_the_protocol_limits() {
    let sim = line();
    sim.device(1)
        .expect("unit")
        .image()
        .holes
        .push((Area::InputRegister, 100..110));
    let mut io = serve_duplex(&sim);
    let answer = exchange(&mut io, &read_request(1, Area::InputRegister, 105, 2), 5).await;
    assert_eq!(answer, exception_answer(1, 4, 2));
    let answer = exchange(&mut io, &read_request(1, Area::HoldingRegister, 0, 126), 5).await;
    assert_eq!(answer, exception_answer(1, 3, 3));
    // Write single register (06) is answered with its echo and lands in the image.
    let mut write = vec![1, 0x06, 0, 1, 0, 7];
    frame::push_crc(&mut write);
    assert_eq!(exchange(&mut io, &write, 8).await, write);
    assert_eq!(sim.device(1).expect("unit").image().hr[1], 7);
    assert_eq!(sim.device(1).expect("unit").writes(), 1);
    // A function the units do not implement (08, diagnostics) is refused.
    let mut diagnostics = vec![1, 0x08, 0, 0, 0x12, 0x34];
    frame::push_crc(&mut diagnostics);
    assert_eq!(
        exchange(&mut io, &diagnostics, 5).await,
        exception_answer(1, 8, 1)
    );
    let mut coils = Vec::new();
    sim.device(2).expect("unit").image().co[..3].copy_from_slice(&[true, false, true]);
    frame::encode_bits(2, 1, &[true, false, true], &mut coils);
    assert_eq!(
        exchange(&mut io, &read_request(2, Area::Coil, 0, 3), 6).await,
        coils
    );
}

#[tokio::test]
async fn a_late_unit_answers_after_the_master_gave_up() {
    let sim = line();
    sim.device(1)
        .expect("unit")
        .faults()
        .delay_ms
        .store(300, Ordering::Relaxed);
    let mut io = serve_duplex(&sim);
    io.write_all(&read_request(1, Area::HoldingRegister, 0, 1))
        .await
        .expect("write");
    assert_silence(&mut io).await;
    let mut answer = vec![0; 7];
    timeout(ANSWER, io.read_exact(&mut answer))
        .await
        .expect("late answer")
        .expect("read");
    assert_eq!(answer, registers_answer(1, &[1]));
}

#[tokio::test]
async fn wire_faults_spoil_the_next_answers() {
    let sim = line();
    let mut io = serve_duplex(&sim);
    let request = read_request(2, Area::HoldingRegister, 0, 3);
    let good = registers_answer(2, &[10, 20, 30]);
    let faults = sim.faults();

    faults.noise_before.store(1, Ordering::Relaxed);
    io.write_all(&request).await.expect("write");
    let noisy = read_burst(&mut io).await;
    assert!(noisy.ends_with(&good), "{noisy:?}");
    assert!(
        (3..=MAX_NOISE).contains(&(noisy.len() - good.len())),
        "{noisy:?}"
    );

    faults.corrupt_crc.store(1, Ordering::Relaxed);
    io.write_all(&request).await.expect("write");
    let corrupt = read_burst(&mut io).await;
    assert_eq!(corrupt.len(), good.len());
    assert_eq!(corrupt[..good.len() - 2], good[..good.len() - 2]);
    assert!(!frame::crc_ok(&corrupt));

    faults.truncate.store(2, Ordering::Relaxed);
    for _ in 0..2 {
        io.write_all(&request).await.expect("write");
        assert_eq!(read_burst(&mut io).await, good[..good.len() / 2]);
    }

    io.write_all(&request).await.expect("write");
    assert_eq!(read_burst(&mut io).await, good);
    assert_eq!(faults.answers(), 5);
    assert_eq!(faults.truncate.load(Ordering::Relaxed), 0);
}
