//! Functions written against PostgreSQL's function-call interface directly (the hot path, and
//! functions that must see an argument's size before reading it): the version-1 info record
//! they declare, and building a composite result quickly (the result type's descriptor is looked
//! up once per call site and kept in `fn_extra`, the way C extensions do it; looking the type up
//! by name on every call would cost more than the reservation itself).

/// Declares the `pg_finfo_<function>` record that tells PostgreSQL a C function uses the
/// version-1 calling convention.
#[macro_export]
macro_rules! pg_finfo_v1 {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            const V1: pgrx::pg_sys::Pg_finfo_record = pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

use pgrx::pg_sys;

use crate::errors::{self, Code};

/// A value for one column of the result.
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int8(i64),
    Text(&'a str),
    /// A datum of the column's own type, already made (for example a jsonb).
    Datum(pg_sys::Datum),
}

impl Value<'_> {
    pub fn opt_text(s: Option<&str>) -> Value<'_> {
        s.map_or(Value::Null, Value::Text)
    }
}

/// Forms the function's composite result from `values`, which must match the result type's
/// columns in number and order.
///
/// # Safety
/// `fcinfo` must be the call's own function-call info.
pub unsafe fn form(fcinfo: pg_sys::FunctionCallInfo, values: &[Value<'_>]) -> pg_sys::Datum {
    unsafe {
        let flinfo = (*fcinfo).flinfo;
        let mut desc = (*flinfo).fn_extra as pg_sys::TupleDesc;
        if desc.is_null() {
            let mut found: pg_sys::TupleDesc = std::ptr::null_mut();
            let class = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut found);
            if class != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || found.is_null() {
                errors::error(
                    Code::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "pg_keypool: function must return a composite type",
                )
                .raise();
            }
            let saved = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = (*flinfo).fn_mcxt;
            let copy = pg_sys::BlessTupleDesc(pg_sys::CreateTupleDescCopy(found));
            pg_sys::CurrentMemoryContext = saved;
            (*flinfo).fn_extra = copy as *mut std::ffi::c_void;
            desc = copy;
        }
        if (*desc).natts as usize != values.len() {
            errors::error(
                Code::ERRCODE_DATATYPE_MISMATCH,
                format!("pg_keypool: result type has {} columns, the library returns {}", (*desc).natts, values.len()),
            )
            .hint("The installed SQL objects and the library are from different versions: ALTER EXTENSION pg_keypool UPDATE.")
            .raise();
        }
        let mut datums: Vec<pg_sys::Datum> = Vec::with_capacity(values.len());
        let mut nulls: Vec<bool> = Vec::with_capacity(values.len());
        for v in values {
            let (d, n) = match v {
                Value::Null => (pg_sys::Datum::from(0), true),
                Value::Bool(b) => (pg_sys::Datum::from(*b), false),
                Value::Int8(i) => (pg_sys::Datum::from(*i), false),
                Value::Text(s) => (
                    pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(s.as_ptr() as *const _, s.len() as i32)),
                    false,
                ),
                Value::Datum(d) => (*d, false),
            };
            datums.push(d);
            nulls.push(n);
        }
        let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::HeapTupleHeaderGetDatum((*tuple).t_data)
    }
}
