//! URLs made fit to print: every secret a store or bus URL can carry replaced by `***`.

/// `url` with its secrets replaced by `***`: the password of each address's user part (a lone
/// user part, a NATS token, is hidden whole) and any `*password*` in the query. Works on every
/// form corral takes: one address with or without a scheme, a NATS list
/// (`nats://a:b@one,nats://two`) and a Sentinel or Cluster list (`redis+sentinel://u:p@s1,s2/m`).
pub fn redact(url: &str) -> String {
    let (addresses, query) = match url.split_once('?') {
        Some((addresses, query)) => (addresses, Some(query)),
        None => (url, None),
    };
    let mut out: String = addresses
        .split(',')
        .map(redact_address)
        .collect::<Vec<_>>()
        .join(",");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.contains("password") => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// One address of a list: `[scheme://][user[:password]@]host[/path]`.
fn redact_address(address: &str) -> String {
    let (scheme, rest) = match address.find("://") {
        Some(at) => address.split_at(at + 3),
        None => ("", address),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{hosts}{path}"),
            // A lone user part is a token for some servers: hidden as a password would be.
            None => format!("{scheme}***@{hosts}{path}"),
        },
        None => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn every_form_of_url_loses_its_secrets() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://default:hunter2@cache:6379/0",
                "redis://default:***@cache:6379/0",
            ),
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            (
                "redis+sentinel://app:secret@s1,s2/m?sentinel_username=w&sentinel_password=x",
                "redis+sentinel://app:***@s1,s2/m?sentinel_username=w&sentinel_password=***",
            ),
            ("redis+cluster://a,b", "redis+cluster://a,b"),
            ("nats://s3cret@nats:4222", "nats://***@nats:4222"),
            (
                "nats://a:b@one:4222,nats://two:4222",
                "nats://a:***@one:4222,nats://two:4222",
            ),
            ("token@host:4222", "***@host:4222"),
            ("nats:4222", "nats:4222"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
