//! The WASI preview1 imports Envoy provides, by hand, reading the harness
//! clock and RNG. No preopens, no files: stdout and stderr become logs.

use wasmtime::Linker;

use crate::abi::errno::{BADF, FAULT, INVAL, NOTSUP, SPIPE, SUCCESS};
use crate::host::Implemented;
use crate::mem::{read, write, write_u32, write_u64, C};
use crate::vm::VmState;

type R = wasmtime::Result<i32>;

/// The module called `proc_exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the module called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

const WASI: &str = "wasi_snapshot_preview1";

pub(crate) fn define(
    linker: &mut Linker<VmState>,
    implemented: &mut Implemented,
) -> anyhow::Result<()> {
    macro_rules! def {
        ($name:literal, $f:expr) => {{
            linker
                .func_wrap(WASI, $name, $f)
                .map_err(anyhow::Error::from)?;
            implemented.insert((WASI.to_string(), $name.to_string()));
        }};
    }
    def!("fd_write", fd_write);
    def!("fd_read", fd_read);
    def!("fd_close", fd_close);
    def!("fd_seek", fd_seek);
    def!("fd_fdstat_get", fd_fdstat_get);
    def!("fd_prestat_get", fd_prestat_get);
    def!("fd_prestat_dir_name", fd_prestat_dir_name);
    def!("clock_time_get", clock_time_get);
    def!("clock_res_get", clock_res_get);
    def!("random_get", random_get);
    def!("environ_get", environ_get);
    def!("environ_sizes_get", environ_sizes_get);
    def!("args_get", args_get);
    def!("args_sizes_get", args_sizes_get);
    def!("proc_exit", proc_exit);
    def!("sched_yield", sched_yield);
    def!("poll_oneoff", poll_oneoff);
    Ok(())
}

/// Reads an iovec array: (ptr u32, len u32) pairs.
fn iovecs(c: &mut C<'_>, iovs: i32, n: i32) -> Option<Vec<(i32, i32)>> {
    let raw = read(c, iovs, (n as u32).checked_mul(8)? as i32)?;
    Some(
        raw.chunks_exact(8)
            .map(|b| {
                (
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                )
            })
            .collect(),
    )
}

fn fd_write(mut c: C<'_>, fd: i32, iovs: i32, n: i32, ret: i32) -> R {
    if fd != 1 && fd != 2 {
        return Ok(BADF);
    }
    let Some(vecs) = iovecs(&mut c, iovs, n) else {
        return Ok(FAULT);
    };
    let mut data = Vec::new();
    for (p, l) in vecs {
        let Some(chunk) = read(&mut c, p, l) else {
            return Ok(FAULT);
        };
        data.extend_from_slice(&chunk);
    }
    let written = data.len() as u32;
    let st = c.data_mut();
    if fd == 1 {
        st.stdout.extend_from_slice(&data);
    } else {
        st.stderr.extend_from_slice(&data);
    }
    st.drain_lines(fd, false);
    Ok(if write_u32(&mut c, ret, written) {
        SUCCESS
    } else {
        FAULT
    })
}

fn fd_read(mut c: C<'_>, fd: i32, _iovs: i32, _n: i32, ret: i32) -> R {
    if fd != 0 {
        return Ok(BADF);
    }
    // stdin is empty.
    Ok(if write_u32(&mut c, ret, 0) {
        SUCCESS
    } else {
        FAULT
    })
}

fn fd_close(_c: C<'_>, _fd: i32) -> R {
    Ok(BADF)
}

fn fd_seek(_c: C<'_>, fd: i32, _offset: i64, _whence: i32, _ret: i32) -> R {
    Ok(if (0..=2).contains(&fd) { SPIPE } else { BADF })
}

fn fd_fdstat_get(mut c: C<'_>, fd: i32, ret: i32) -> R {
    if !(0..=2).contains(&fd) {
        return Ok(BADF);
    }
    // fdstat: u8 filetype, u16 flags, u64 rights_base, u64 rights_inheriting.
    let mut stat = [0u8; 24];
    stat[0] = 2; // character device
    let rights: u64 = if fd == 0 { 1 << 1 } else { 1 << 6 }; // fd_read / fd_write
    stat[8..16].copy_from_slice(&rights.to_le_bytes());
    Ok(if write(&mut c, ret, &stat) {
        SUCCESS
    } else {
        FAULT
    })
}

fn fd_prestat_get(_c: C<'_>, _fd: i32, _ret: i32) -> R {
    Ok(BADF)
}

fn fd_prestat_dir_name(_c: C<'_>, _fd: i32, _p: i32, _l: i32) -> R {
    Ok(BADF)
}

fn clock_time_get(mut c: C<'_>, id: i32, _precision: i64, ret: i32) -> R {
    let now = {
        let s = c.data().lock();
        match id {
            0 => s.realtime,
            1 => s.monotonic,
            _ => return Ok(NOTSUP),
        }
    };
    Ok(if write_u64(&mut c, ret, now) {
        SUCCESS
    } else {
        FAULT
    })
}

fn clock_res_get(mut c: C<'_>, id: i32, ret: i32) -> R {
    if id != 0 && id != 1 {
        return Ok(NOTSUP);
    }
    Ok(if write_u64(&mut c, ret, 1) {
        SUCCESS
    } else {
        FAULT
    })
}

fn random_get(mut c: C<'_>, ptr: i32, len: i32) -> R {
    let len = len as u32 as usize;
    if len > 64 * 1024 * 1024 {
        return Ok(INVAL);
    }
    let mut buf = vec![0u8; len];
    c.data().lock().rng.fill(&mut buf);
    Ok(if write(&mut c, ptr, &buf) {
        SUCCESS
    } else {
        FAULT
    })
}

fn environ_strings(c: &C<'_>) -> Vec<Vec<u8>> {
    c.data()
        .lock()
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect()
}

fn environ_sizes_get(mut c: C<'_>, ret_count: i32, ret_size: i32) -> R {
    let env = environ_strings(&c);
    let size: usize = env.iter().map(Vec::len).sum();
    let ok =
        write_u32(&mut c, ret_count, env.len() as u32) && write_u32(&mut c, ret_size, size as u32);
    Ok(if ok { SUCCESS } else { FAULT })
}

fn environ_get(mut c: C<'_>, ptrs: i32, buf: i32) -> R {
    let env = environ_strings(&c);
    let mut at = buf as u32;
    for (i, e) in env.iter().enumerate() {
        if !write_u32(&mut c, ptrs.wrapping_add(4 * i as i32), at) || !write(&mut c, at as i32, e) {
            return Ok(FAULT);
        }
        at += e.len() as u32;
    }
    Ok(SUCCESS)
}

fn args_sizes_get(mut c: C<'_>, ret_count: i32, ret_size: i32) -> R {
    let ok = write_u32(&mut c, ret_count, 0) && write_u32(&mut c, ret_size, 0);
    Ok(if ok { SUCCESS } else { FAULT })
}

fn args_get(_c: C<'_>, _ptrs: i32, _buf: i32) -> R {
    Ok(SUCCESS)
}

fn proc_exit(_c: C<'_>, code: i32) -> wasmtime::Result<()> {
    Err(wasmtime::Error::new(ProcExit(code)))
}

fn sched_yield(_c: C<'_>) -> R {
    Ok(SUCCESS)
}

/// Answers every subscription at once (clocks do not sleep: time moves only
/// when the test advances it).
fn poll_oneoff(mut c: C<'_>, subs: i32, events: i32, n: i32, ret: i32) -> R {
    if n <= 0 {
        return Ok(INVAL);
    }
    for i in 0..n {
        let Some(sub) = read(&mut c, subs.wrapping_add(48 * i), 48) else {
            return Ok(FAULT);
        };
        let mut ev = [0u8; 32];
        ev[0..8].copy_from_slice(&sub[0..8]); // userdata
        ev[10] = sub[8]; // event type = subscription tag
        if !write(&mut c, events.wrapping_add(32 * i), &ev) {
            return Ok(FAULT);
        }
    }
    Ok(if write_u32(&mut c, ret, n as u32) {
        SUCCESS
    } else {
        FAULT
    })
}
