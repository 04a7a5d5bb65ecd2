//! A Modbus TCP server simulator built on tokio-modbus's server.
//!
//! It holds a full register image per area, can have holes (ranges that answer exception 02, as
//! real devices with sparse register maps do), counts the requests it receives, and can be told
//! to answer late, not at all, or with a given exception, so tests can drive every failure path.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::modbus::codec;
use crate::modbus::{Area, DataType, WordOrder};
use crate::model::Value;

const SPACE: usize = 1 << 16;

/// The register image of a simulated device.
#[derive(Debug, Clone)]
pub struct Image {
    /// Holding registers.
    pub hr: Vec<u16>,
    /// Input registers.
    pub ir: Vec<u16>,
    /// Coils.
    pub co: Vec<bool>,
    /// Discrete inputs.
    pub di: Vec<bool>,
    /// Ranges that do not exist: a read touching one answers exception 02.
    pub holes: Vec<(Area, Range<u16>)>,
    /// Ranges that answer this exception code (e.g. 4, device failure).
    pub failing: Vec<(Area, Range<u16>, u8)>,
}

impl Default for Image {
    fn default() -> Self {
        Image {
            hr: vec![0; SPACE],
            ir: vec![0; SPACE],
            co: vec![false; SPACE],
            di: vec![false; SPACE],
            holes: Vec::new(),
            failing: Vec::new(),
        }
    }
}

impl Image {
    /// Writes a typed value at a register address of `hr` or `ir`.
    pub fn set(
        &mut self,
        area: Area,
        offset: u16,
        data_type: DataType,
        order: WordOrder,
        length: u16,
        value: &Value,
    ) {
        let regs = codec::encode_registers(data_type, order, length, value);
        let table = match area {
            Area::InputRegister => &mut self.ir,
            _ => &mut self.hr,
        };
        for (i, r) in regs.into_iter().enumerate() {
            if let Some(slot) = table.get_mut(usize::from(offset) + i) {
                *slot = r;
            }
        }
    }

    fn check(&self, area: Area, start: u16, count: u16) -> Result<Range<usize>, ExceptionCode> {
        let range = usize::from(start)..usize::from(start) + usize::from(count);
        if count == 0 || range.end > SPACE {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let overlaps =
            |r: &Range<u16>| usize::from(r.start) < range.end && range.start < usize::from(r.end);
        if self.holes.iter().any(|(a, r)| *a == area && overlaps(r)) {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        if let Some((_, _, code)) = self
            .failing
            .iter()
            .find(|(a, r, _)| *a == area && overlaps(r))
        {
            return Err(ExceptionCode::new(*code));
        }
        Ok(range)
    }

    /// The answer to a request: a read or write of the image, or the exception the device
    /// gives. Writes take coils and holding registers (functions 5, 6, 15, 16 and the mask
    /// write, 22).
    pub(crate) fn answer(&mut self, req: &Request<'_>) -> Result<Response, ExceptionCode> {
        match *req {
            Request::WriteSingleCoil(a, on) => {
                let r = self.check(Area::Coil, a, 1)?;
                self.co[r].fill(on);
                Ok(Response::WriteSingleCoil(a, on))
            }
            Request::WriteMultipleCoils(a, ref bits) => {
                let n = u16::try_from(bits.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                let r = self.check(Area::Coil, a, n)?;
                self.co[r].copy_from_slice(bits);
                Ok(Response::WriteMultipleCoils(a, n))
            }
            Request::WriteSingleRegister(a, word) => {
                let r = self.check(Area::HoldingRegister, a, 1)?;
                self.hr[r].fill(word);
                Ok(Response::WriteSingleRegister(a, word))
            }
            Request::WriteMultipleRegisters(a, ref words) => {
                let n = u16::try_from(words.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                let r = self.check(Area::HoldingRegister, a, n)?;
                self.hr[r].copy_from_slice(words);
                Ok(Response::WriteMultipleRegisters(a, n))
            }
            Request::MaskWriteRegister(a, and_mask, or_mask) => {
                let r = self.check(Area::HoldingRegister, a, 1)?;
                for reg in &mut self.hr[r] {
                    *reg = (*reg & and_mask) | (or_mask & !and_mask);
                }
                Ok(Response::MaskWriteRegister(a, and_mask, or_mask))
            }
            Request::ReadHoldingRegisters(a, n) => {
                let r = self.check(Area::HoldingRegister, a, n)?;
                Ok(Response::ReadHoldingRegisters(self.hr[r].to_vec()))
            }
            Request::ReadInputRegisters(a, n) => {
                let r = self.check(Area::InputRegister, a, n)?;
                Ok(Response::ReadInputRegisters(self.ir[r].to_vec()))
            }
            Request::ReadCoils(a, n) => {
                let r = self.check(Area::Coil, a, n)?;
                Ok(Response::ReadCoils(self.co[r].to_vec()))
            }
            Request::ReadDiscreteInputs(a, n) => {
                let r = self.check(Area::DiscreteInput, a, n)?;
                Ok(Response::ReadDiscreteInputs(self.di[r].to_vec()))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// Counters and fault switches of a simulated device.
#[derive(Debug, Default)]
pub struct Faults {
    /// Requests received.
    pub requests: AtomicU64,
    /// Delay before each answer, in milliseconds.
    pub delay_ms: AtomicU64,
    /// When set, requests are swallowed without an answer.
    pub silent: AtomicBool,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Write requests received (functions 5, 6, 15, 16, 22), answered or not.
    pub writes: AtomicU64,
    /// When set, the mask write (function 22) is answered with exception 01 (illegal
    /// function), as by devices that do not implement it.
    pub no_mask_write: AtomicBool,
}

/// A simulated device: its register image and fault switches, shared with its server.
#[derive(Debug, Clone, Default)]
pub struct SimDevice {
    image: Arc<Mutex<Image>>,
    faults: Arc<Faults>,
}

impl SimDevice {
    /// A device with an all-zero image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks the register image for reading or changing it.
    pub fn image(&self) -> MutexGuard<'_, Image> {
        // A poisoned lock only means a test thread panicked while holding it; the image is plain data.
        self.image.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fault switches and counters.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Write requests received so far.
    pub fn writes(&self) -> u64 {
        self.faults.writes.load(Ordering::Relaxed)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.faults.requests.load(Ordering::Relaxed)
    }

    /// Starts a server for this device on `addr` (use `127.0.0.1:0`).
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let device = self.clone();
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream, socket_addr| {
                let device = device.clone();
                device.faults.connections.fetch_add(1, Ordering::Relaxed);
                async move {
                    accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(device.clone())))
                }
            };
            let _ = server
                .serve_until(
                    &on_connected,
                    |_err| {},
                    async move { stop.cancelled().await },
                )
                .await;
        });
        Ok(SimServer { addr, cancel, task })
    }

    /// Keeps the demo profile's values moving until cancelled (see [`SimDevice::demo`]).
    pub fn animate(&self, period: Duration, cancel: CancellationToken) -> JoinHandle<()> {
        let device = self.clone();
        tokio::spawn(async move {
            let mut tick: u64 = 0;
            let mut interval = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = interval.tick() => {}
                }
                tick += 1;
                device.image().apply_demo_values(tick);
            }
        })
    }

    /// A device with the demo register map: counter hr:0 (u16), sine hr:1 (f32), ramp hr:3
    /// (i32, CDAB), wave hr:5 (f64), status hr:10 (string, 16 bytes), coils co:0..4.
    pub fn demo() -> Self {
        let d = SimDevice::new();
        d.image().apply_demo_values(0);
        d
    }
}

impl Image {
    fn apply_demo_values(&mut self, tick: u64) {
        let t = tick as f64 / 10.0;
        let hr = Area::HoldingRegister;
        self.set(
            hr,
            0,
            DataType::U16,
            WordOrder::ABCD,
            0,
            &Value::UInt(tick % 65536),
        );
        self.set(
            hr,
            1,
            DataType::F32,
            WordOrder::ABCD,
            0,
            &Value::Float((t * 0.5).sin()),
        );
        let ramp = (tick % 2000) as i64 - 1000;
        self.set(
            hr,
            3,
            DataType::I32,
            WordOrder::CDAB,
            0,
            &Value::Int(ramp * 1000),
        );
        self.set(
            hr,
            5,
            DataType::F64,
            WordOrder::ABCD,
            0,
            &Value::Float(20.0 + 5.0 * (t * 0.1).cos()),
        );
        let status = ["RUNNING", "RUNNING", "RUNNING", "SETUP", "IDLE"][((tick / 50) % 5) as usize];
        self.set(
            hr,
            10,
            DataType::String,
            WordOrder::ABCD,
            16,
            &Value::Text(status.into()),
        );
        for i in 0..4u16 {
            self.co[usize::from(i)] = (tick / (5 * (u64::from(i) + 1))) % 2 == 1;
        }
    }
}

impl Service for SimDevice {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.faults.requests.fetch_add(1, Ordering::Relaxed);
        let delay = Duration::from_millis(self.faults.delay_ms.load(Ordering::Relaxed));
        let silent = self.faults.silent.load(Ordering::Relaxed);
        let write = matches!(
            req.request,
            Request::WriteSingleCoil(..)
                | Request::WriteMultipleCoils(..)
                | Request::WriteSingleRegister(..)
                | Request::WriteMultipleRegisters(..)
                | Request::MaskWriteRegister(..)
        );
        if write {
            self.faults.writes.fetch_add(1, Ordering::Relaxed);
        }
        let mask_refused = matches!(req.request, Request::MaskWriteRegister(..))
            && self.faults.no_mask_write.load(Ordering::Relaxed);
        let answer = if silent {
            // A silent device changes nothing.
            Err(ExceptionCode::ServerDeviceFailure)
        } else if mask_refused {
            Err(ExceptionCode::IllegalFunction)
        } else {
            self.image().answer(&req.request)
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if silent {
                return Ok(None);
            }
            answer.map(Some)
        })
    }
}

/// A running simulator server; dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct SimServer {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl SimServer {
    /// A handle on a server task that stops when `cancel` is cancelled.
    pub(crate) fn from_parts(
        addr: SocketAddr,
        cancel: CancellationToken,
        task: JoinHandle<()>,
    ) -> Self {
        SimServer { addr, cancel, task }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and closes every connection it has.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// Several devices behind one Modbus TCP server, addressed by unit id, as behind a Modbus TCP
/// to RTU gateway.
#[derive(Debug, Clone)]
struct Units(Arc<HashMap<u8, SimDevice>>);

impl Service for Units {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        match self.0.get(&req.slave) {
            Some(device) => device.call(req),
            // What a real gateway answers when nothing behind it responds for that unit.
            None => Box::pin(std::future::ready(Err(ExceptionCode::GatewayTargetDevice))),
        }
    }
}

/// Starts a Modbus TCP server on `addr` (use `127.0.0.1:0`) answering for several units, as a
/// Modbus TCP gateway with devices behind it does: each request goes to the device of its unit
/// id (silence and delay as in [`SimDevice::serve`]); an unknown unit id answers exception 0x0B
/// (gateway target device failed to respond). Every accepted connection is counted on every
/// unit.
pub async fn serve_units(
    units: Vec<(u8, SimDevice)>,
    addr: SocketAddr,
) -> std::io::Result<SimServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let units = Units(Arc::new(units.into_iter().collect()));
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, socket_addr| {
            let units = units.clone();
            for device in units.0.values() {
                device.faults.connections.fetch_add(1, Ordering::Relaxed);
            }
            async move { accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(units.clone()))) }
        };
        let _ = server
            .serve_until(
                &on_connected,
                |_err| {},
                async move { stop.cancelled().await },
            )
            .await;
    });
    Ok(SimServer::from_parts(addr, cancel, task))
}
