//! The pure parts of the test API server: label and field selectors, the patch formats, and
//! server-side apply's field ownership. Semantics follow apimachinery (labels.Parse,
//! fields.ParseSelector, jsonpatch, structured-merge-diff) for the shapes our objects use.

use serde_json::{Map, Value};

use crate::refusal::Refusal;

// ---------------------------------------------------------------------------------------------
// Label selectors (k8s.io/apimachinery/pkg/labels): =, ==, !=, in, notin, exists, !exists.

#[derive(Debug, Clone, PartialEq)]
pub enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

pub fn parse_label_selector(s: &str) -> Result<Vec<Req>, Refusal> {
    let mut reqs = Vec::new();
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    for part in parts {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        let words: Vec<&str> = p.split_whitespace().collect();
        let req = if let Some(k) = p.strip_prefix('!') {
            Req::NotExists(k.trim().to_string())
        } else if words.len() >= 2 && (words[1] == "in" || words[1] == "notin") {
            let key = words[0].to_string();
            let rest = p[p.find(words[1]).unwrap() + words[1].len()..].trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    Refusal::BadRequest(format!(
                        "unable to parse requirement: found '{rest}', expected: '('"
                    ))
                })?;
            let vals = inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if words[1] == "in" {
                Req::In(key, vals)
            } else {
                Req::NotIn(key, vals)
            }
        } else if let Some((k, v)) = p.split_once("!=") {
            Req::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once("==") {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once('=') {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if words.len() == 1 {
            Req::Exists(p.to_string())
        } else {
            return Err(Refusal::BadRequest(format!(
                "unable to parse requirement: {p:?}"
            )));
        };
        reqs.push(req);
    }
    Ok(reqs)
}

pub fn labels_match(reqs: &[Req], obj: &Value) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Req::Eq(k, v) => get(k) == Some(v.as_str()),
        Req::Ne(k, v) => get(k) != Some(v.as_str()),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
    })
}

/// Field selectors: `metadata.name`, `metadata.namespace` with = / == / !=.
pub fn parse_field_selector(s: &str) -> Result<Vec<(String, bool, String)>, Refusal> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, eq, v) = if let Some((k, v)) = p.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = p.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = p.split_once('=') {
            (k, true, v)
        } else {
            return Err(Refusal::BadRequest(format!(
                "invalid selector: '{p}'; can't understand '{p}'"
            )));
        };
        if k != "metadata.name" && k != "metadata.namespace" {
            return Err(Refusal::BadRequest(format!(
                "field label not supported: {k}"
            )));
        }
        out.push((k.to_string(), eq, v.to_string()));
    }
    Ok(out)
}

pub fn fields_match(sel: &[(String, bool, String)], obj: &Value) -> bool {
    sel.iter().all(|(k, eq, v)| {
        let ptr = if k == "metadata.name" {
            "/metadata/name"
        } else {
            "/metadata/namespace"
        };
        let actual = obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
        (actual == v) == *eq
    })
}

// ---------------------------------------------------------------------------------------------
// Patches.

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Strategic merge patch for the shapes we store: a merge patch whose lists of objects with a
/// `name` (containers, env, volumes, ports) merge by that key, as their patchMergeKey says.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if k.starts_with("$") {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else if let Some(existing) = t.get_mut(k) {
                    strategic_merge_patch(existing, v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(t), Value::Array(p))
            if p.iter().all(|e| e.get("name").is_some())
                && t.iter().all(|e| e.get("name").is_some()) =>
        {
            for item in p {
                match t.iter_mut().find(|e| e.get("name") == item.get("name")) {
                    Some(e) => strategic_merge_patch(e, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), Refusal> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| Refusal::Invalid(format!("invalid path {path:?}")))?;
    let p = doc
        .pointer_mut(parent)
        .ok_or_else(|| Refusal::Invalid(format!("doc is missing path: {parent:?}")))?;
    Ok((p, unescape(last)))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), Refusal> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, key) = pointer_parent(doc, path)?;
    match parent {
        Value::Object(m) => {
            m.insert(key, value);
        }
        Value::Array(a) => {
            if key == "-" {
                a.push(value);
            } else {
                let i: usize = key
                    .parse()
                    .map_err(|_| Refusal::Invalid(format!("invalid index {key:?}")))?;
                if i > a.len() {
                    return Err(Refusal::Invalid(format!("index out of bounds: {i}")));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(Refusal::Invalid(format!("doc is missing path: {path:?}"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, Refusal> {
    let (parent, key) = pointer_parent(doc, path)?;
    match parent {
        Value::Object(m) => m
            .remove(&key)
            .ok_or_else(|| Refusal::Invalid(format!("unable to remove nonexistent key: {key}"))),
        Value::Array(a) => {
            let i: usize = key
                .parse()
                .map_err(|_| Refusal::Invalid(format!("invalid index {key:?}")))?;
            (i < a.len())
                .then(|| a.remove(i))
                .ok_or_else(|| Refusal::Invalid(format!("index out of bounds: {i}")))
        }
        _ => Err(Refusal::Invalid(format!("doc is missing path: {path:?}"))),
    }
}

/// RFC 6902 JSON patch.
fn invalid(message: &str) -> Refusal {
    Refusal::Invalid(message.to_string())
}

pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), Refusal> {
    let ops = ops
        .as_array()
        .ok_or_else(|| invalid("a JSON patch is a list of operations"))?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| invalid("operation without path"))?;
        match op["op"].as_str() {
            Some("add") => add(doc, path, op["value"].clone())?,
            Some("remove") => {
                remove(doc, path)?;
            }
            Some("replace") => {
                doc.pointer(path).ok_or_else(|| {
                    Refusal::Invalid(format!(
                        "replace operation does not apply: doc is missing key: {path}"
                    ))
                })?;
                *doc.pointer_mut(path).unwrap() = op["value"].clone();
            }
            Some("test") => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(Refusal::Invalid(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            Some("move") => {
                let v = remove(
                    doc,
                    op["from"]
                        .as_str()
                        .ok_or_else(|| invalid("move without from"))?,
                )?;
                add(doc, path, v)?;
            }
            Some("copy") => {
                let v = doc
                    .pointer(
                        op["from"]
                            .as_str()
                            .ok_or_else(|| invalid("copy without from"))?,
                    )
                    .cloned()
                    .ok_or_else(|| invalid("copy from a missing path"))?;
                add(doc, path, v)?;
            }
            other => return Err(Refusal::Invalid(format!("Unexpected kind: {other:?}"))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server-side apply: field ownership by manager, at the granularity of leaf fields (lists are
// atomic, as `x-kubernetes-list-type: atomic`).

/// Separates path segments: keys may contain dots (`dssm-ca.crt`). Shown as `.` in messages.
pub const SEP: char = '\u{1f}';

pub fn show(path: &str) -> String {
    path.replace(SEP, ".")
}

/// Leaf paths of an object (`.data.dssm-ca.crt`), skipping what the server owns.
pub fn leaf_paths(v: &Value) -> Vec<(String, Value)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    let p = format!("{prefix}{SEP}{k}");
                    if matches!(
                        show(&p).as_str(),
                        ".apiVersion"
                            | ".kind"
                            | ".metadata.name"
                            | ".metadata.namespace"
                            | ".metadata.resourceVersion"
                            | ".metadata.uid"
                            | ".metadata.managedFields"
                            | ".metadata.creationTimestamp"
                            | ".metadata.generation"
                            | ".status"
                    ) {
                        continue;
                    }
                    walk(&p, child, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

pub fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches(SEP)
        .split(SEP)
        .try_fold(v, |cur, k| cur.get(k))
}

/// Removes `path` and then any map left empty above it.
pub fn remove_path(v: &mut Value, path: &str) {
    let keys: Vec<&str> = path.trim_start_matches(SEP).split(SEP).collect();
    fn go(v: &mut Value, keys: &[&str]) {
        let Some(m) = v.as_object_mut() else { return };
        if keys.len() == 1 {
            m.remove(keys[0]);
            return;
        }
        if let Some(child) = m.get_mut(keys[0]) {
            go(child, &keys[1..]);
            if child.as_object().is_some_and(|c| c.is_empty()) {
                m.remove(keys[0]);
            }
        }
    }
    go(v, &keys);
}

/// `fieldsV1` (`{"f:data":{"f:key":{}}}`) from leaf paths, and back.
pub fn fields_v1(paths: &[String]) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for k in p.trim_start_matches(SEP).split(SEP) {
            cur = cur
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .unwrap();
        }
    }
    Value::Object(root)
}

pub fn paths_of_fields_v1(v: &Value) -> Vec<String> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() {
            out.push(prefix.to_string());
            return;
        }
        for (k, child) in m {
            if let Some(name) = k.strip_prefix("f:") {
                walk(&format!("{prefix}{SEP}{name}"), child, out);
            }
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

#[derive(Debug, Clone)]
pub struct Manager {
    pub name: String,
    pub operation: String,
    pub api_version: String,
    pub paths: Vec<String>,
}

pub fn managers_of(obj: &Value) -> Vec<Manager> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| Manager {
                    name: e["manager"].as_str().unwrap_or("").into(),
                    operation: e["operation"].as_str().unwrap_or("Update").into(),
                    api_version: e["apiVersion"].as_str().unwrap_or("v1").into(),
                    paths: paths_of_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn set_managers(obj: &mut Value, managers: &[Manager], now: &str) {
    let entries: Vec<Value> = managers
        .iter()
        .filter(|m| !m.paths.is_empty())
        .map(|m| {
            serde_json::json!({
                "manager": m.name, "operation": m.operation, "apiVersion": m.api_version,
                "time": now, "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&m.paths),
            })
        })
        .collect();
    obj["metadata"]["managedFields"] = Value::Array(entries);
}

/// After a non-apply write by `manager`: it owns every leaf it changed or added; others lose
/// those leaves (updates never conflict).
pub fn record_update(
    before: Option<&Value>,
    after: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    let mut managers = before.map(managers_of).unwrap_or_default();
    let changed: Vec<String> = leaf_paths(after)
        .into_iter()
        .filter(|(p, v)| before.and_then(|b| get_path(b, p)) != Some(v))
        .map(|(p, _)| p)
        .collect();
    let still_there = |p: &String| get_path(after, p).is_some();
    for m in managers.iter_mut() {
        m.paths.retain(|p| !changed.contains(p) && still_there(p));
    }
    if !changed.is_empty() {
        match managers
            .iter_mut()
            .find(|m| m.name == manager && m.operation == "Update")
        {
            Some(m) => {
                for p in changed {
                    if !m.paths.contains(&p) {
                        m.paths.push(p);
                    }
                }
            }
            None => managers.push(Manager {
                name: manager.into(),
                operation: "Update".into(),
                api_version: api_version.into(),
                paths: changed,
            }),
        }
    }
    set_managers(after, &managers, now);
}

/// Server-side apply of `applied` by `manager` onto `current` (None: create). Returns the new
/// object or the conflict message of a 409.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, Refusal> {
    let mut managers = current.map(managers_of).unwrap_or_default();
    let wanted = leaf_paths(applied);
    let mut conflicts: Vec<(String, String)> = Vec::new();
    if let Some(cur) = current {
        for (p, v) in &wanted {
            for m in managers
                .iter()
                .filter(|m| m.name != manager && m.paths.contains(p))
            {
                if get_path(cur, p) != Some(v) {
                    conflicts.push((m.name.clone(), p.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let n = conflicts.len();
        let body = if n == 1 {
            format!(
                "conflict with \"{}\" using {api_version}: {}",
                conflicts[0].0,
                show(&conflicts[0].1)
            )
        } else {
            let mut s = String::new();
            let mut by: Vec<&String> = conflicts.iter().map(|c| &c.0).collect();
            by.dedup();
            for m in by {
                s.push_str(&format!("conflicts with \"{m}\" using {api_version}:"));
                for c in conflicts.iter().filter(|c| &c.0 == m) {
                    s.push_str(&format!("\n- {}", show(&c.1)));
                }
                s.push('\n');
            }
            s.trim_end().to_string()
        };
        return Err(Refusal::Conflict(format!(
            "Apply failed with {n} conflict{}: {body}",
            if n == 1 { "" } else { "s" }
        )));
    }
    let wanted_paths: Vec<String> = wanted.iter().map(|(p, _)| p.clone()).collect();
    for m in managers.iter_mut().filter(|m| m.name != manager) {
        m.paths.retain(|p| !wanted_paths.contains(p));
    }
    let mut obj = current.cloned().unwrap_or_else(|| serde_json::json!({}));
    // Fields this manager applied before and no longer applies, owned by nobody else, go.
    let previous: Vec<String> = managers
        .iter()
        .find(|m| m.name == manager && m.operation == "Apply")
        .map(|m| m.paths.clone())
        .unwrap_or_default();
    for p in previous.iter().filter(|p| !wanted_paths.contains(p)) {
        if !managers
            .iter()
            .any(|m| m.name != manager && m.paths.contains(p))
        {
            remove_path(&mut obj, p);
        }
    }
    for (p, v) in &wanted {
        let mut cur = &mut obj;
        let keys: Vec<&str> = p.trim_start_matches(SEP).split(SEP).collect();
        for k in &keys[..keys.len() - 1] {
            if !cur.get(*k).is_some_and(Value::is_object) {
                cur[*k] = serde_json::json!({});
            }
            cur = cur.get_mut(*k).unwrap();
        }
        cur[keys[keys.len() - 1]] = v.clone();
    }
    for k in ["apiVersion", "kind"] {
        obj[k] = applied[k].clone();
    }
    managers.retain(|m| !(m.name == manager && m.operation == "Apply"));
    managers.push(Manager {
        name: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        paths: wanted_paths,
    });
    set_managers(&mut obj, &managers, now);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_parse_like_apimachinery() {
        let obj = json!({"metadata": {"labels": {"app": "f5-dssm-db", "tier": "x"}}});
        for (sel, want) in [
            ("app in (f5-dssm-db, f5-dssm-sentinel)", true),
            ("app in (f5-dssm-sentinel)", false),
            ("app notin (f5-tmm)", true),
            ("app=f5-dssm-db,tier", true),
            ("app==f5-dssm-db,!tier", false),
            ("app!=f5-dssm-db", false),
            ("missing", false),
            ("!missing", true),
        ] {
            assert_eq!(
                labels_match(&parse_label_selector(sel).unwrap(), &obj),
                want,
                "{sel}"
            );
        }
    }
}
