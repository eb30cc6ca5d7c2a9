//! What a module may do in its granted directories beyond WASI's own
//! checks (which keep it inside them, and read-only unless writable):
//!
//! - it opens only regular files and directories. Opening a FIFO blocks
//!   the host thread until something writes to it, for good if nothing
//!   does, and a device or a socket is no file a plugin has business with;
//! - it creates symbolic links only where its manifest allows
//!   (`grants.symlinks`): a link planted in a shared directory, say to
//!   `/etc/passwd`, is followed by whatever host tool reads it next.
//!
//! Both are host functions of `wasi:filesystem/types` that modrun defines
//! over wasmtime-wasi's own, calling them once its check passes.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::{WasiFilesystemCtxView, WasiFilesystemView};
use wasmtime_wasi::p2::FsResult;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorType, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};

use super::host::HostState;

/// The interface wasmtime-wasi provides, at the version it provides; guests
/// built against any earlier 0.2 version link to it too.
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Puts modrun's checks in front of `open-at` and `symlink-at` in a linker
/// that already holds wasmtime-wasi's filesystem.
pub(crate) fn guard(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, HostState>,
         (dir, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let mut fs = store.data_mut().filesystem();
                let opened = open_at(&mut fs, dir, path_flags, path, open_flags, flags).await;
                Ok((error_code(opened)?,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store: StoreContextMut<'_, HostState>,
         (dir, target, link): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                if !store.data().symlinks_allowed {
                    return Ok((Err(ErrorCode::NotPermitted),));
                }
                let mut fs = store.data_mut().filesystem();
                let made = HostDescriptor::symlink_at(&mut fs, dir, target, link).await;
                Ok((error_code(made)?,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Opens what `path` names if it is a regular file, a directory, or a link
/// (whose target is checked in turn when followed); refuses anything else.
///
/// The check and the open are two steps: a file swapped in between by
/// another process is not caught. A guest cannot make special files, so
/// that takes a host process racing it in a directory it was granted.
async fn open_at(
    fs: &mut WasiFilesystemCtxView<'_>,
    dir: Resource<Descriptor>,
    path_flags: PathFlags,
    path: String,
    open_flags: OpenFlags,
    flags: DescriptorFlags,
) -> FsResult<Resource<Descriptor>> {
    let borrowed = Resource::new_borrow(dir.rep());
    // A path that does not exist yet (to be created) fails here and is left
    // to the open itself.
    if let Ok(stat) = HostDescriptor::stat_at(fs, borrowed, path_flags, path.clone()).await
        && !matches!(
            stat.type_,
            DescriptorType::RegularFile | DescriptorType::Directory | DescriptorType::SymbolicLink
        )
    {
        return Err(ErrorCode::NotPermitted.into());
    }
    HostDescriptor::open_at(fs, dir, path_flags, path, open_flags, flags).await
}

/// A filesystem result as the guest receives it: its error code, or a trap
/// for a failure that is not one.
fn error_code<T>(result: FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => Ok(Err(e.downcast()?)),
    }
}
