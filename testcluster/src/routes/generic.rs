//! The generic store's verbs, which every API group serves for its resources, as
//! k8s.io/apiserver's registry/generic/registry Store does: get, list, create, update, patch
//! (JSON, merge, strategic merge, server-side apply), delete (graceful for Pods) and
//! deletecollection, with the strategies of our kinds (Secret normalization, validation).

use base64::Engine;
use hyper::Response;
use serde_json::{json, Value};

use super::{
    bad_request, json_response, modified, not_found, parse_body, refused, status_error, Body, Call,
};
use crate::controllers::{mark_terminating, mark_terminating_with_grace};
use crate::logic::*;
use crate::store::{Resource, State};

/// Serves a verb on a resource (no subresource: those are the groups' own).
pub(super) fn serve(s: &mut State, c: &Call) -> Response<Body> {
    match (c.verb, c.p.sub.as_deref()) {
        ("get", None) => match s.get(c.p.res, &c.ns(), &c.name()) {
            Some(o) => json_response(200, o),
            None => not_found(c.p.res, &c.name()),
        },
        ("list", None) => list(s, c),
        ("create", None) => create(s, c),
        ("update", None) | ("patch", None) => write(s, c),
        ("delete", None) => delete(s, c),
        ("deletecollection", None) => delete_collection(s, c),
        _ => status_error(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        ),
    }
}

fn list(s: &State, c: &Call) -> Response<Body> {
    let r = c.p.res;
    let items: Vec<Value> = s
        .list(r, c.p.ns.as_deref())
        .into_iter()
        .filter(|o| labels_match(&c.labels, o) && fields_match(&c.fields, o))
        .map(|o| {
            let mut o = o.clone();
            let m = o.as_object_mut().unwrap();
            m.remove("apiVersion");
            m.remove("kind");
            o
        })
        .collect();
    json_response(
        200,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

/// The body of a create: JSON, YAML or (for the kinds it knows) protobuf; an object.
fn new_object(c: &Call) -> Result<Value, Response<Body>> {
    let r = c.p.res;
    let protobuf = c
        .content_type
        .starts_with("application/vnd.kubernetes.protobuf");
    let parsed = match protobuf
        .then(|| crate::protobuf::object(c.body, r.kind, &r.api_version()))
        .flatten()
    {
        Some(decoded) => decoded,
        None => parse_body(c.body, c.content_type),
    };
    match parsed {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(bad_request(
            "the body of the request was in an unknown format",
        )),
        Err(e) => Err(refused(&e, None)),
    }
}

fn create(s: &mut State, c: &Call) -> Response<Body> {
    let (r, ns) = (c.p.res, c.ns());
    let mut obj = match new_object(c) {
        Ok(o) => o,
        Err(refused) => return refused,
    };
    if let Some(gen) = obj["metadata"]["generateName"]
        .as_str()
        .filter(|_| obj["metadata"]["name"].is_null())
    {
        let id = s.next_rv();
        obj["metadata"]["name"] = json!(format!("{gen}{id:05x}"));
    }
    if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
        if body_ns != ns {
            return bad_request("the namespace of the provided object does not match the namespace sent on the request");
        }
    }
    if r.kind == "Secret" {
        normalize_secret(&mut obj);
    }
    if let Err(m) = validate(r, &obj) {
        let name = obj["metadata"]["name"].as_str().unwrap_or("");
        return status_error(422, "Invalid", &m, Some((name, r.group, r.kind)));
    }
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    if s.get(r, &ns, &name).is_some() {
        return status_error(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", r.qualified()),
            Some((&name, r.group, r.plural)),
        );
    }
    for k in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove(k);
        }
    }
    if c.q.contains_key("dryRun") {
        return json_response(201, &obj);
    }
    record_update(None, &mut obj, &c.manager, &r.api_version(), &c.now);
    let stored = s.put(r, &ns, obj);
    json_response(201, &stored)
}

/// update (PUT) and patch (PATCH, including server-side apply, which may create).
fn write(s: &mut State, c: &Call) -> Response<Body> {
    let (r, name) = (c.p.res, c.name());
    let current = s.get(r, &c.ns(), &name).cloned();
    let parsed = match parse_body(c.body, c.content_type) {
        Ok(v) => v,
        Err(e) => return refused(&e, None),
    };
    let obj = match (c.verb, current.as_ref()) {
        ("update", None) => return not_found(r, &name),
        ("update", Some(cur)) => replaced(c, cur, parsed, &name),
        (_, None) if c.is_apply() => applied(c, None, &parsed).map(|mut o| {
            o["metadata"]["name"] = json!(name);
            o
        }),
        (_, None) => return not_found(r, &name),
        (_, Some(cur)) => patched(c, cur, &parsed, &name),
    };
    match obj {
        Ok(obj) => store_write(s, c, current, obj, &name),
        Err(refused) => refused,
    }
}

/// An update's object: the body, with what the server owns kept from `cur`.
fn replaced(c: &Call, cur: &Value, parsed: Value, name: &str) -> Result<Value, Response<Body>> {
    let want_rv = parsed["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if !want_rv.is_empty() && want_rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("") {
        return Err(modified(c.p.res, name));
    }
    let mut o = parsed.clone();
    for k in ["uid", "creationTimestamp"] {
        o["metadata"][k] = cur["metadata"][k].clone();
    }
    o["metadata"]["managedFields"] = cur["metadata"]["managedFields"].clone();
    if o.get("status").is_none_or(Value::is_null) {
        o["status"] = cur["status"].clone();
    }
    Ok(o)
}

/// Server-side apply of `parsed` onto `cur` (None: the apply creates).
fn applied(c: &Call, cur: Option<&Value>, parsed: &Value) -> Result<Value, Response<Body>> {
    if !c.q.contains_key("fieldManager") {
        return Err(bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
    }
    let force = c.q.get("force").is_some_and(|f| f == "true");
    apply(
        cur,
        parsed,
        &c.manager,
        force,
        &c.p.res.api_version(),
        &c.now,
    )
    .map_err(|e| refused(&e, None))
}

/// A patch of an existing object, by its content type.
fn patched(c: &Call, cur: &Value, parsed: &Value, name: &str) -> Result<Value, Response<Body>> {
    if let Some(rv) = parsed
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        if !c.is_apply() && rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("") {
            return Err(modified(c.p.res, name));
        }
    }
    let mut o = cur.clone();
    let ct = c.content_type;
    if c.is_apply() {
        o = applied(c, Some(cur), parsed)?;
    } else if ct.starts_with("application/json-patch+json") {
        json_patch(&mut o, parsed).map_err(|e| refused(&e, None))?;
    } else if ct.starts_with("application/merge-patch+json") {
        merge_patch(&mut o, parsed);
    } else if ct.starts_with("application/strategic-merge-patch+json") {
        strategic_merge_patch(&mut o, parsed);
    } else {
        return Err(status_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml", None));
    }
    Ok(o)
}

/// Validates and stores an update's or patch's result (`current`: the object before).
fn store_write(
    s: &mut State,
    c: &Call,
    current: Option<Value>,
    mut obj: Value,
    name: &str,
) -> Response<Body> {
    let r = c.p.res;
    if r.kind == "Secret" {
        normalize_secret(&mut obj);
    }
    obj["metadata"]["name"] = json!(name);
    if let Err(m) = validate(r, &obj) {
        return status_error(422, "Invalid", &m, Some((name, r.group, r.kind)));
    }
    if c.q.contains_key("dryRun") {
        return json_response(200, &obj);
    }
    if !c.is_apply() {
        record_update(
            current.as_ref(),
            &mut obj,
            &c.manager,
            &r.api_version(),
            &c.now,
        );
    }
    // A write that changes nothing keeps the resourceVersion, as the API server does.
    if let Some(cur) = &current {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
            v["apiVersion"] = json!(r.api_version());
            v["kind"] = json!(r.kind);
            v
        };
        if strip(cur) == strip(&obj) {
            return json_response(200, cur);
        }
    }
    let created = current.is_none();
    let stored = s.put(r, &c.ns(), obj);
    json_response(if created { 201 } else { 200 }, &stored)
}

/// delete, with DeleteOptions' grace period and resourceVersion precondition; a Pod is
/// deleted gracefully (it terminates first).
fn delete(s: &mut State, c: &Call) -> Response<Body> {
    let (r, ns, name) = (c.p.res, c.ns(), c.name());
    let Some(cur) = s.get(r, &ns, &name).cloned() else {
        return not_found(r, &name);
    };
    let options = parse_body(c.body, c.content_type).ok();
    // DeleteOptions.gracePeriodSeconds, in the body or as a query parameter.
    let grace = options
        .as_ref()
        .and_then(|b| b["gracePeriodSeconds"].as_i64())
        .or_else(|| c.q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    if let Some(pre) = options.as_ref().and_then(|b| {
        b.pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from)
    }) {
        if Some(pre.as_str()) != cur["metadata"]["resourceVersion"].as_str() {
            return status_error(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the ResourceVersion in the precondition ({pre}) does not match the ResourceVersion in record ({}). The object might have been modified", r.qualified(), cur["metadata"]["resourceVersion"].as_str().unwrap_or("")), Some((&name, r.group, r.plural)));
        }
    }
    if r.kind == "Pod" {
        mark_terminating_with_grace(s, &ns, &name, grace);
        // Removed at once (grace 0): the response is the object as it was last.
        let o = s.get(r, &ns, &name).cloned().unwrap_or(cur);
        return json_response(200, &o);
    }
    s.remove(r, &ns, &name);
    json_response(
        200,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": name, "group": r.group, "kind": r.plural, "uid": cur["metadata"]["uid"]}}),
    )
}

fn delete_collection(s: &mut State, c: &Call) -> Response<Body> {
    let (r, ns) = (c.p.res, c.ns());
    let victims: Vec<Value> = s
        .list(r, c.p.ns.as_deref())
        .into_iter()
        .filter(|o| labels_match(&c.labels, o) && fields_match(&c.fields, o))
        .cloned()
        .collect();
    let mut out = Vec::new();
    for v in victims {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        if r.kind == "Pod" {
            mark_terminating(s, &ns, &name);
            out.push(s.get(r, &ns, &name).cloned().unwrap());
        } else if let Some(o) = s.remove(r, &ns, &name) {
            out.push(o);
        }
    }
    json_response(
        200,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": s.rv.to_string()}, "items": out}),
    )
}

/// Checks what the API server validates for our kinds; returns the 422 message.
fn validate(r: &Resource, obj: &Value) -> Result<(), String> {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let kind = r.kind;
    if name.is_empty() {
        return Err(format!("{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"));
    }
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !dns(name) {
        return Err(format!("{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    if r.kind == "Secret" {
        if let Some(data) = obj["data"].as_object() {
            for (k, v) in data {
                if k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(format!("Secret \"{name}\" is invalid: data[{k}]: Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                }
                if !v.is_string()
                    || base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .is_err()
                {
                    return Err(format!(
                        "Secret \"{name}\" is invalid: data[{k}]: illegal base64 data"
                    ));
                }
            }
        }
    }
    if (r.kind == "Deployment" || r.kind == "StatefulSet")
        && obj["spec"]["replicas"].as_i64().is_some_and(|n| n < 0)
    {
        {
            return Err(format!("{kind}.apps \"{name}\" is invalid: spec.replicas: Invalid value: {}: must be greater than or equal to 0", obj["spec"]["replicas"]));
        }
    }
    Ok(())
}

/// stringData is write-only: merged into data, as the API server does.
fn normalize_secret(obj: &mut Value) {
    if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
        if let Some(sd) = sd.as_object() {
            for (k, v) in sd {
                obj["data"][k] = json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or("").as_bytes()));
            }
        }
    }
    if obj.get("type").is_none_or(Value::is_null) {
        obj["type"] = json!("Opaque");
    }
}
