//! Plain HTTP APIs (SERP and the like), reached through `/v1/proxy/<pool>/<path>`: the worker
//! forwards the app's request to the key's base URL plus the path, with the key where the API
//! wants it. The base URL's fragment says where (fragments never reach a server):
//! `https://serpapi.com#query=api_key` puts it in the query parameter `api_key`,
//! `https://api.example.com#header=X-API-KEY` in that header; without a fragment it goes in
//! `Authorization: Bearer`.

use super::{percent_encoded, KeyRef};

#[derive(Debug, PartialEq, Eq)]
pub enum Auth {
    Bearer,
    Header(String),
    Query(String),
}

/// The base URL without its fragment, and where the key goes.
pub fn split(base_url: &str) -> Result<(&str, Auth), String> {
    let Some((base, fragment)) = base_url.split_once('#') else {
        return Ok((base_url.trim_end_matches('/'), Auth::Bearer));
    };
    let auth = match fragment.split_once('=') {
        Some(("query", name)) if !name.is_empty() => Auth::Query(name.to_string()),
        Some(("header", name)) if !name.is_empty() => Auth::Header(name.to_string()),
        _ => {
            return Err(format!(
                "the base URL's fragment \"#{fragment}\" should be #query=NAME or #header=NAME"
            ))
        }
    };
    Ok((base.trim_end_matches('/'), auth))
}

/// Builds the forwarded request. `path` is what followed the pool in the proxy route, `query`
/// the app's query string.
pub fn proxy_request(
    http: &reqwest::Client,
    key: &KeyRef,
    method: reqwest::Method,
    path: &str,
    query: Option<&str>,
) -> Result<reqwest::RequestBuilder, String> {
    let (base, auth) = split(&key.base_url)?;
    let mut url = format!("{base}/{}", under_base(path)?);
    let mut params: Vec<String> = query
        .filter(|q| !q.is_empty())
        .map(|q| vec![q.to_string()])
        .unwrap_or_default();
    if let Auth::Query(name) = &auth {
        params.push(format!("{}={}", percent_encoded(name), percent_encoded(&key.secret)));
    }
    if !params.is_empty() {
        url.push('?');
        url.push_str(&params.join("&"));
    }
    let builder = http.request(method, url);
    Ok(match auth {
        Auth::Bearer => builder.bearer_auth(&key.secret),
        Auth::Header(name) => builder.header(name, &key.secret),
        Auth::Query(_) => builder,
    })
}

/// The path a caller asked for (already percent-decoded by the router), as segments under the
/// key's base URL: `.` and `..` segments are refused (they would leave the base URL's path, in
/// whatever encoding they came), and each segment is encoded again, so that nothing in it (a
/// `?`, a `#`, an encoded slash) changes where the request goes.
pub fn under_base(path: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for segment in path.trim_start_matches('/').split('/') {
        // Servers differ in what else separates (`\`) or ends (`;` parameters) a segment:
        // a dot segment in any of those readings is refused too.
        if segment.split(['\\', ';']).any(|p| p == "." || p == "..") {
            return Err("the path must not contain `.` or `..` segments".into());
        }
        out.push(path_segment(segment));
    }
    Ok(out.join("/"))
}

/// Percent-encodes a path segment: RFC 3986's unreserved characters, sub-delimiters but `;`,
/// `:` and `@` stay as they are.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(base: &str) -> KeyRef {
        KeyRef {
            id: 3,
            provider: "http".into(),
            model: None,
            base_url: base.into(),
            secret: "serp key+1".into(),
            label: "se…+1".into(),
        }
    }

    #[test]
    fn where_the_key_goes() {
        assert_eq!(split("https://a/b").unwrap(), ("https://a/b", Auth::Bearer));
        assert_eq!(
            split("https://a#query=api_key").unwrap(),
            ("https://a", Auth::Query("api_key".into()))
        );
        assert_eq!(
            split("https://a/#header=X-API-KEY").unwrap(),
            ("https://a", Auth::Header("X-API-KEY".into()))
        );
        assert!(split("https://a#api_key").is_err());

        let http = reqwest::Client::new();
        let r = proxy_request(
            &http,
            &key("https://serp.test#query=api_key"),
            reqwest::Method::GET,
            "/search",
            Some("q=rust"),
        )
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            r.url().as_str(),
            "https://serp.test/search?q=rust&api_key=serp%20key%2B1"
        );
        let r = proxy_request(
            &http,
            &key("https://x.test#header=X-API-KEY"),
            reqwest::Method::POST,
            "v2/find",
            None,
        )
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(r.url().as_str(), "https://x.test/v2/find");
        assert_eq!(r.headers()["x-api-key"], "serp key+1");
        // Nothing leaves the base URL's path, whatever the encoding (the router decoded it).
        let base = key("https://x.test/api/v1#header=X-API-KEY");
        for bad in [
            "../../admin",
            "a/../../b",
            "./x",
            "a/..",
            "..",
            "..;/admin",
            "x/..;jsessionid=1/y",
            "..\\admin",
            "a\\..\\b",
        ] {
            assert!(
                proxy_request(&http, &base, reqwest::Method::GET, bad, None).is_err(),
                "{bad}"
            );
        }
        let r = proxy_request(&http, &base, reqwest::Method::GET, "search/a b?c#d/..%2f", None)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(r.url().as_str(), "https://x.test/api/v1/search/a%20b%3Fc%23d/..%252f");
        assert!(r.url().path().starts_with("/api/v1/"));
    }
}
