//! The README and the book in docs/ cannot rot: every relative link resolves (the file, and the
//! heading its `#anchor` names), and every `dssm-certs …` command line shown in a code block is
//! one the binary accepts (its flags and values parse; `--help` is appended so nothing runs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The page's text outside fenced code blocks, and the blocks' lines.
fn split(text: &str) -> (Vec<&str>, Vec<&str>) {
    let (mut prose, mut code, mut fenced) = (Vec::new(), Vec::new(), false);
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            code.push(line);
        } else {
            prose.push(line);
        }
    }
    (prose, code)
}

fn anchors(page: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(page).unwrap();
    split(&text)
        .0
        .iter()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| slug(h.trim_start_matches('#')))
        .collect()
}

/// `[text](target)` targets of a line, outside inline code.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_link_of_the_readme_and_the_book_resolves() {
    let mut broken = Vec::new();
    let mut seen = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for line in split(&text).0 {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                seen += 1;
                let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
                let dest = if file.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(file)
                };
                if !dest.exists() {
                    broken.push(format!("{}: {target}: no such file", page.display()));
                } else if !anchor.is_empty() && !anchors(&dest).contains(anchor) {
                    broken.push(format!("{}: {target}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        seen >= 6,
        "the README links the book's pages ({seen} links seen)"
    );
}

/// Shell words of a command line, up to the first pipe, redirection, `&&`, `;` or comment.
fn words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, '|' | '>' | '&' | ';' | '#') if !any || cur.is_empty() => break,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// Every `dssm-certs …` line of the code blocks (`$ ` prompts dropped, `\` continuations joined).
fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for line in split(text).1 {
        let line = line.trim();
        let joined = match pending.take() {
            Some(p) => format!("{p} {line}"),
            None => line.strip_prefix("$ ").unwrap_or(line).to_string(),
        };
        if let Some(cont) = joined.strip_suffix('\\') {
            pending = Some(cont.trim_end().to_string());
        } else if joined.starts_with("dssm-certs ") {
            out.push(joined);
        }
    }
    out
}

#[test]
fn every_command_the_readme_and_the_book_show_is_accepted_by_the_binary() {
    let mut refused = Vec::new();
    let mut seen = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for line in command_lines(&text) {
            let args = words(&line);
            seen += 1;
            let out = Command::new(env!("CARGO_BIN_EXE_dssm-certs"))
                .args(&args[1..])
                .arg("--help")
                .env_clear()
                .output()
                .unwrap();
            if !out.status.success() {
                refused.push(format!(
                    "{}: {line}\n  {}",
                    page.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    assert!(seen >= 10, "the docs show the commands ({seen} seen)");
}

#[test]
fn a_made_up_flag_is_refused_so_the_command_check_can_fail() {
    let args = words("dssm-certs generate --out d --no-such-flag # comment");
    assert_eq!(
        args,
        ["dssm-certs", "generate", "--out", "d", "--no-such-flag"]
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dssm-certs"))
        .args(&args[1..])
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unknown flag before --help is refused"
    );
    assert_eq!(
        words(r#"dssm-certs run --maintenance-window "0 3 * * SUN 2h"   # renews"#),
        [
            "dssm-certs",
            "run",
            "--maintenance-window",
            "0 3 * * SUN 2h"
        ]
    );
    assert_eq!(
        slug("2c. Install by hand (`kubectl apply -n`)"),
        "2c-install-by-hand-kubectl-apply--n"
    );
}
