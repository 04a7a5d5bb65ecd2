//! The Modbus TCP connection against a peer on 127.0.0.1 that plays a device byte for byte, to
//! answer late or in a way the simulators never do. (The simulators' interop is checked end to
//! end in `tests/tests/modbus_driver.rs`, `device_faults.rs` and `modbus_writes.rs`.)

use super::*;
use crate::modbus::mbap::{Mismatch, MAX_ADU};
use tokio::net::TcpListener;

/// Long enough never to run out in a test where the answer is there.
const PATIENCE: Duration = Duration::from_secs(10);

/// Reads one request ADU.
async fn request(stream: &mut TcpStream) -> Vec<u8> {
    let mut adu = vec![0u8; mbap::HEADER_LEN];
    stream.read_exact(&mut adu).await.unwrap();
    let length = usize::from(u16::from_be_bytes([adu[4], adu[5]]));
    adu.resize(mbap::HEADER_LEN - 1 + length, 0);
    stream
        .read_exact(&mut adu[mbap::HEADER_LEN..])
        .await
        .unwrap();
    adu
}

/// A device's normal answer to the register read `request`: `value` in every register.
fn answer(request: &[u8], value: u16) -> Vec<u8> {
    let count = usize::from(u16::from_be_bytes([request[10], request[11]]));
    let mut out = request[..4].to_vec();
    out.extend_from_slice(&(3 + 2 * count as u16).to_be_bytes());
    out.extend_from_slice(&[request[6], request[7], (2 * count) as u8]);
    for _ in 0..count {
        out.extend_from_slice(&value.to_be_bytes());
    }
    out
}

/// A listener and its address.
async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

#[tokio::test]
async fn a_late_answer_to_an_earlier_request_is_not_taken_for_the_next_one() {
    let (listener, addr) = listen().await;
    let device = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // The first request is answered only once the second one came: late.
        let first = request(&mut s).await;
        let second = request(&mut s).await;
        s.write_all(&answer(&first, 1111)).await.unwrap();
        s.write_all(&answer(&second, 2222)).await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let mut conn = TcpConn::connect(&addr, PATIENCE, Duration::ZERO)
        .await
        .unwrap();
    let first = conn
        .read(1, Area::HoldingRegister, 0, 2, Duration::from_millis(50))
        .await;
    assert!(matches!(first, Err(ReadError::NoAnswer(_))), "{first:?}");
    // The line driver drops a connection after a timeout; reused all the same, the late
    // answer that comes first is refused for its transaction id, never taken as the values.
    let second = conn.read(1, Area::HoldingRegister, 0, 2, PATIENCE).await;
    assert!(
        matches!(
            second,
            Err(ReadError::Mismatch(Mismatch::Transaction {
                sent: 2,
                got: 1
            }))
        ),
        "{second:?}"
    );
    conn.close().await;
    device.await.unwrap();
}

#[tokio::test]
async fn the_largest_answers_fit_the_connection_s_buffer_which_never_grows() {
    let (listener, addr) = listen().await;
    let device = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let read = request(&mut s).await;
        s.write_all(&answer(&read, 0xA55A)).await.unwrap();
        let write = request(&mut s).await;
        // The echo of a write of several registers: function, address and count.
        let mut echo = write[..4].to_vec();
        echo.extend_from_slice(&[0, 6]);
        echo.extend_from_slice(&write[6..12]);
        s.write_all(&echo).await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let mut conn = TcpConn::connect(&addr, PATIENCE, Duration::ZERO)
        .await
        .unwrap();
    let regs = conn
        .read(7, Area::InputRegister, 100, 125, PATIENCE)
        .await
        .unwrap();
    assert_eq!(regs, Ok(BlockData::Registers(vec![0xA55A; 125])));
    let plan = WritePlan::Registers(vec![1; 123]);
    assert_eq!(conn.write(7, 10, &plan, PATIENCE).await.unwrap(), Ok(()));
    assert_eq!(conn.buf.capacity(), MAX_ADU);
    conn.close().await;
    device.await.unwrap();
}
