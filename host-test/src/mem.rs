//! Guest memory access for hostcalls.

use wasmtime::{Caller, Memory};

use crate::abi::Status;
use crate::vm::VmState;

pub(crate) type C<'a> = Caller<'a, VmState>;

fn memory(c: &mut C<'_>) -> Option<Memory> {
    c.get_export("memory").and_then(|e| e.into_memory())
}

/// Copies `len` bytes at `ptr` out of guest memory; None when out of bounds.
pub(crate) fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(c)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*c).get(p..p.checked_add(l)?).map(|s| s.to_vec())
}

pub(crate) fn write(c: &mut C<'_>, ptr: i32, data: &[u8]) -> bool {
    let Some(mem) = memory(c) else { return false };
    let p = ptr as u32 as usize;
    let Some(end) = p.checked_add(data.len()) else {
        return false;
    };
    match mem.data_mut(&mut *c).get_mut(p..end) {
        Some(dst) => {
            dst.copy_from_slice(data);
            true
        }
        None => false,
    }
}

pub(crate) fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(c: &mut C<'_>, ptr: i32, v: u64) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `size` bytes with the module's `proxy_on_memory_allocate`
/// (or `malloc`). Returns 0 when the module's allocator does.
fn alloc(c: &mut C<'_>, size: usize) -> wasmtime::Result<u32> {
    let func = c
        .get_export("proxy_on_memory_allocate")
        .or_else(|| c.get_export("malloc"))
        .and_then(|e| e.into_func())
        .ok_or_else(|| {
            wasmtime::Error::msg("the module exports neither proxy_on_memory_allocate nor malloc")
        })?;
    let typed = func.typed::<i32, i32>(&*c)?;
    let p = typed.call(&mut *c, size as i32)?;
    Ok(p as u32)
}

/// Returns bytes to the module: allocates a copy in guest memory and writes
/// its pointer and size to `ptr_ptr` / `size_ptr`. Empty data is returned as
/// (0, 0) without allocating.
pub(crate) fn give(
    c: &mut C<'_>,
    data: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let ptr = if data.is_empty() {
        0
    } else {
        let p = alloc(c, data.len())?;
        if p == 0 || !write(c, p as i32, data) {
            return Ok(Status::InvalidMemoryAccess.code());
        }
        p
    };
    if !write_u32(c, ptr_ptr, ptr) || !write_u32(c, size_ptr, data.len() as u32) {
        return Ok(Status::InvalidMemoryAccess.code());
    }
    Ok(Status::Ok.code())
}
