//! Locks that outlive a panic. modrun's critical sections never leave
//! shared state half-changed (each does its update in one step, or only
//! reads), so a lock that a panicking thread poisoned still guards
//! consistent state: these take it all the same, instead of spreading the
//! panic to every later caller.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`], through poisoning.
pub(crate) trait LockUnpoisoned<T: ?Sized> {
    /// The lock, whether or not a panic poisoned it.
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockUnpoisoned<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], through poisoning.
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
pub(crate) trait RwLockUnpoisoned<T: ?Sized> {
    /// Shared access, whether or not a panic poisoned the lock.
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    /// Exclusive access, whether or not a panic poisoned the lock.
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockUnpoisoned<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}
