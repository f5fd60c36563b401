-- Pools, keys and quota scopes (accounts), and the validation of every argument.
SELECT keypool_create_pool('chat', 'chat completions');
SELECT try($$SELECT keypool_create_pool('chat')$$);
SELECT try($$SELECT keypool_create_pool(NULL)$$);
SELECT try($$SELECT keypool_create_pool('  ')$$);

-- Two keys of one OpenAI organization share its limits; a key without an account is its own
-- scope; Gemini's daily window resets at midnight Pacific by default.
SELECT keypool_add_key('chat', 'openai', 'sk-proj-alpha-0000000001', 'gpt-4o', account => 'org-a', rpm => 10, tpm => 1000);
SELECT keypool_add_key('chat', 'openai', 'sk-proj-alpha-0000000002', 'gpt-4o', account => 'org-a');
SELECT keypool_add_key('chat', 'openai', 'sk-proj-beta-00000000003', 'gpt-4o');
SELECT keypool_add_key('chat', 'gemini', 'AIzaSy-gemini-000000000004', 'gemini-2.5-flash', rpm => 15, rpd => 200);
-- The same account with another model is another scope.
SELECT keypool_add_key('chat', 'openai', 'sk-proj-alpha-0000000006', 'gpt-4o-mini', account => 'org-a', rpm => 30);

-- Adding a secret already in the pool returns the existing key.
SELECT keypool_add_key('chat', 'openai', 'sk-proj-alpha-0000000001', 'gpt-4o', account => 'org-a');
-- Limits given for an existing account replace its limits (all four: NULL means no limit).
SELECT keypool_add_key('chat', 'openai', 'sk-proj-alpha-0000000005', 'gpt-4o', account => 'org-a', rpm => 20);

SELECT key_id, pool, provider, model, account, label, state, scope_id FROM keypool_keys ORDER BY key_id;
SELECT scope_id, provider, account, model, timezone, rpm, rpd, tpm, tpd, keys FROM keypool_scopes ORDER BY scope_id;

-- Bad input: a clear error with its SQLSTATE, and nothing is added.
SELECT try($$SELECT keypool_add_key('nope', 'openai', 'sk-nothing-1234567')$$);
SELECT try($$SELECT keypool_add_key('chat', 'bogus', 'sk-nothing-1234567')$$);
SELECT try($$SELECT keypool_add_key('chat', NULL, 'sk-nothing-1234567')$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', '')$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', NULL)$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', 'sk-nothing-1234567', rpm => 0)$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', 'sk-nothing-1234567', rpd => -1)$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', 'sk-nothing-1234567', tpd => -5)$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai_compatible', 'sk-nothing-1234567')$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', 'sk-nothing-1234567', base_url => 'ftp://host')$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', 'sk-nothing-1234567', timezone => 'Mars/Olympus')$$);
SELECT try($$SELECT keypool_add_key('chat', 'openai', repeat('x', 9000))$$);
SELECT count(*) AS keys, (SELECT count(*) FROM keypool.scope) AS scopes FROM keypool_keys;

-- Any base URL for OpenAI-compatible servers and plain HTTP APIs (such as SERP).
SELECT keypool_create_pool('search');
SELECT keypool_add_key('search', 'http', 'serp-key-0000000000000001', base_url => 'https://serpapi.example/search/', rpd => 100);
SELECT key_id, provider, model, label FROM keypool_keys WHERE pool = 'search';
SELECT base_url FROM keypool.key WHERE provider = 'http';

-- Keys and errors never show a secret: only the masked label.
SELECT count(*) AS secrets_in_keys_view FROM keypool_keys k WHERE row_to_json(k)::text LIKE '%alpha-00000%';
SELECT count(*) AS secrets_in_scopes_view FROM keypool_scopes s WHERE row_to_json(s)::text LIKE '%alpha-00000%';
SELECT count(*) AS secrets_in_events_view FROM keypool_events e WHERE row_to_json(e)::text LIKE '%alpha-00000%';
SELECT kind, pool, key_id, label FROM keypool_events ORDER BY id;
