-- Installing the extension, and the guarantees about its surface.
CREATE EXTENSION pg_keypool;

-- Every function and view of the extension has a comment (psql's \df+ and \dv+ show it).
SELECT pg_describe_object(d.classid, d.objid, 0) AS missing_comment
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_keypool')
   AND d.deptype = 'e'
   AND ((d.classid = 'pg_proc'::regclass AND obj_description(d.objid, 'pg_proc') IS NULL)
     OR (d.classid = 'pg_class'::regclass
         AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'v'
         AND obj_description(d.objid, 'pg_class') IS NULL));

-- Nothing is open to PUBLIC: neither functions, nor views, nor the tables holding secrets; only
-- the three filters the views apply, which answer about the calling role alone.
SELECT d.objid::regprocedure AS function_open_to_public
  FROM pg_depend d
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_keypool')
   AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
   AND has_function_privilege('public', d.objid, 'EXECUTE')
 ORDER BY d.objid::regprocedure::text COLLATE "C";
SELECT count(*) AS relations_open_to_public
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE (n.nspname = 'keypool' OR c.relname LIKE 'keypool%')
   AND c.relkind IN ('r', 'v')
   AND has_table_privilege('public', c.oid, 'SELECT');
SELECT has_schema_privilege('public', 'keypool', 'USAGE') AS public_uses_internal_schema;

-- The public API.
\x on
SELECT p.proname, pg_get_function_arguments(p.oid) AS arguments, pg_get_function_result(p.oid) AS result
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'keypool%'
 ORDER BY 1;
\x off

-- Helpers for the other tests: the SQLSTATE and message of an error, or 'ok'; and the number of
-- grants out of n reservations.
CREATE FUNCTION try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    -- Reservation ids differ from run to run.
    RETURN SQLSTATE || ' ' || regexp_replace(SQLERRM, '[0-9]{10,}', 'N', 'g');
END
$$;

CREATE FUNCTION granted_of(pool text, n int, tokens bigint DEFAULT 0) RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FILTER (WHERE (r).granted)
      FROM (SELECT keypool_reserve('user-' || i, pool, tokens) AS r FROM generate_series(1, n) i) s
$$;
