//! Running internal queries as the extension's owner.
//!
//! Callers are granted EXECUTE on the public functions, never access to the internal tables
//! (which hold the secrets). Internal queries switch to the owner for their duration, the way
//! PostgreSQL itself runs SECURITY DEFINER functions, without paying for that on every call.

use pgrx::pg_sys;

struct Restore {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Runs `f` with `user`'s privileges, and restores the caller's afterwards (also on error).
pub fn as_user<R>(user: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_context = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(user, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _restore = Restore {
        user: saved_user,
        context: saved_context,
    };
    f()
}
