//! Internal queries that must see the latest committed rows whatever the caller's snapshot or
//! isolation level (SPI with a fresh snapshot), with plans prepared once per backend where the
//! same query runs on every call, and rows read by column number.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::FromDatum;

use crate::errors::{self, Code};

/// One row of a query result, with typed column access.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    pub fn get_opt<T: FromDatum>(&self, col: usize) -> Option<T> {
        unsafe {
            let mut is_null = false;
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, col as i32 + 1, &mut is_null);
            T::from_datum(datum, is_null)
        }
    }

    pub fn get<T: FromDatum>(&self, col: usize) -> T {
        match self.get_opt(col) {
            Some(v) => v,
            None => errors::error(
                Code::ERRCODE_INTERNAL_ERROR,
                format!("pg_keypool: unexpected NULL in column {col}"),
            )
            .raise(),
        }
    }
}

/// Runs a read-only query with the latest snapshot (not the transaction's) inside an open SPI
/// connection, and maps each row.
pub fn fresh_rows<T>(sql: &CStr, f: impl FnMut(&Row) -> T) -> Vec<T> {
    unsafe {
        let plan = prepare(sql, &mut [], 0);
        let out = run_fresh(plan, sql, &mut [], f);
        pg_sys::SPI_freeplan(plan);
        out
    }
}

/// A plan kept for the life of the backend (one per call site).
pub struct KeptPlan(std::cell::Cell<pg_sys::SPIPlanPtr>);

impl KeptPlan {
    pub const fn new() -> Self {
        KeptPlan(std::cell::Cell::new(std::ptr::null_mut()))
    }
}

/// Like [`fresh_rows`], with parameters, and a plan prepared once per backend (`kept`).
pub fn fresh_rows_kept<T>(
    kept: &KeptPlan,
    sql: &CStr,
    types: &mut [pg_sys::Oid],
    args: &mut [pg_sys::Datum],
    f: impl FnMut(&Row) -> T,
) -> Vec<T> {
    unsafe {
        if kept.0.get().is_null() {
            let plan = prepare(sql, types, 0);
            pg_sys::SPI_keepplan(plan);
            kept.0.set(plan);
        }
        run_fresh(kept.0.get(), sql, args, f)
    }
}

/// Like [`fresh_rows`], allowing a parallel plan (a large scan run once, such as counting a
/// pool's members when it is loaded).
pub fn fresh_rows_parallel<T>(sql: &CStr, f: impl FnMut(&Row) -> T) -> Vec<T> {
    unsafe {
        let plan = prepare(sql, &mut [], pg_sys::CURSOR_OPT_PARALLEL_OK as i32);
        let out = run_fresh(plan, sql, &mut [], f);
        pg_sys::SPI_freeplan(plan);
        out
    }
}

unsafe fn prepare(sql: &CStr, types: &mut [pg_sys::Oid], cursor_options: i32) -> pg_sys::SPIPlanPtr {
    unsafe {
        let plan = pg_sys::SPI_prepare_cursor(sql.as_ptr(), types.len() as i32, types.as_mut_ptr(), cursor_options);
        if plan.is_null() {
            errors::error(
                Code::ERRCODE_INTERNAL_ERROR,
                format!("pg_keypool: cannot prepare {sql:?}"),
            )
            .raise();
        }
        plan
    }
}

unsafe fn run_fresh<T>(
    plan: pg_sys::SPIPlanPtr,
    sql: &CStr,
    args: &mut [pg_sys::Datum],
    mut f: impl FnMut(&Row) -> T,
) -> Vec<T> {
    unsafe {
        let status = pg_sys::SPI_execute_snapshot(
            plan,
            if args.is_empty() {
                std::ptr::null_mut()
            } else {
                args.as_mut_ptr()
            },
            std::ptr::null(),
            pg_sys::GetLatestSnapshot(),
            std::ptr::null_mut(),
            true,
            false,
            0,
        );
        if status != pg_sys::SPI_OK_SELECT as i32 {
            errors::error(
                Code::ERRCODE_INTERNAL_ERROR,
                format!("pg_keypool: query failed ({status}): {sql:?}"),
            )
            .raise();
        }
        let table = pg_sys::SPI_tuptable;
        let n = pg_sys::SPI_processed as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let row = Row {
                tuple: *(*table).vals.add(i),
                desc: (*table).tupdesc,
            };
            out.push(f(&row));
        }
        pg_sys::SPI_freetuptable(table);
        out
    }
}
