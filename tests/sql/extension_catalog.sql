-- Describes every object of extension pg_keypool as text lines, so that two databases can be
-- compared: one with the extension created at the current version, one upgraded to it. A
-- difference means the upgrade script does not produce what a fresh install does.
WITH ext AS (
    SELECT e.oid, e.extconfig FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_keypool'
), member AS (
    SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), acl(kind, name, acl) AS (
    SELECT 'function', p.oid::regprocedure::text,
           (SELECT string_agg(a.grantee::regrole::text || ':' || a.privilege_type, ',' ORDER BY 1)
              FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a)
      FROM pg_catalog.pg_proc p JOIN member m ON m.classid = 'pg_catalog.pg_proc'::regclass AND m.objid = p.oid
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           (SELECT string_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END || ':' || a.privilege_type, ',' ORDER BY 1)
              FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a)
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
)
SELECT line FROM (
    SELECT 'function ' || p.oid::regprocedure::text || E'\n' || pg_catalog.pg_get_functiondef(p.oid)
           || E'\ncomment: ' || coalesce(obj_description(p.oid, 'pg_proc'), '-') AS line
      FROM pg_catalog.pg_proc p JOIN member m ON m.classid = 'pg_catalog.pg_proc'::regclass AND m.objid = p.oid
     WHERE p.prokind <> 'a'
    UNION ALL
    SELECT 'view ' || c.oid::regclass::text || ' ' || coalesce(c.reloptions::text, '') || E'\n'
           || pg_catalog.pg_get_viewdef(c.oid) || E'\ncomment: ' || coalesce(obj_description(c.oid, 'pg_class'), '-')
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
     WHERE c.relkind = 'v'
    UNION ALL
    SELECT 'column ' || c.oid::regclass::text || '.' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
           || coalesce(' DEFAULT ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
           || CASE WHEN a.attidentity <> '' THEN ' IDENTITY ' || a.attidentity::text ELSE '' END
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
     WHERE c.relkind IN ('r', 'v', 'c')
    UNION ALL
    SELECT 'table ' || c.oid::regclass::text || ' ' || coalesce(c.reloptions::text, '')
           || ' comment: ' || coalesce(obj_description(c.oid, 'pg_class'), '-')
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
     WHERE c.relkind = 'r'
    UNION ALL
    SELECT 'constraint ' || con.conrelid::regclass::text || ' ' || con.conname || ' ' || pg_catalog.pg_get_constraintdef(con.oid)
      FROM pg_catalog.pg_constraint con JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = con.conrelid
    UNION ALL
    SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
      FROM pg_catalog.pg_index i JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = i.indrelid
    UNION ALL
    SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(t.oid)
      FROM pg_catalog.pg_trigger t JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = t.tgrelid
     WHERE NOT t.tgisinternal
    UNION ALL
    SELECT 'privileges ' || kind || ' ' || name || ' ' || coalesce(acl, '') FROM acl
    UNION ALL
    SELECT 'sequence ' || c.oid::regclass::text || coalesce(' owned by ' || d.refobjid::regclass::text || '.' || a.attname, '')
      FROM pg_catalog.pg_class c JOIN member m ON m.classid = 'pg_catalog.pg_class'::regclass AND m.objid = c.oid
      LEFT JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                                     AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'a'
      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
     WHERE c.relkind = 'S'
    UNION ALL
    SELECT 'dumped ' || cfg::regclass::text FROM ext, unnest(ext.extconfig) cfg
    UNION ALL
    SELECT 'type ' || t.oid::regtype::text FROM pg_catalog.pg_type t
      JOIN member m ON m.classid = 'pg_catalog.pg_type'::regclass AND m.objid = t.oid
    UNION ALL
    SELECT 'schema ' || n.nspname || ' ' || coalesce(n.nspacl::text, '') FROM pg_catalog.pg_namespace n
      JOIN member m ON m.classid = 'pg_catalog.pg_namespace'::regclass AND m.objid = n.oid
) lines
ORDER BY line;
