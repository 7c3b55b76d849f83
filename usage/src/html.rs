//! `--html`: one self-contained page (no external fetches): the report's tables and a bar
//! chart of grants used against granted per owner, drawn by an inline script into an SVG.
//! When the chart is drawn the page sets `data-chart="drawn"` on `<body>`, which a headless
//! browser's `--dump-dom` shows (the test reads it, and checks the screenshot's bar colours).

use super::Report;

/// Bar colours (the screenshot test looks for them).
pub const GRANTED_RGB: (u8, u8, u8) = (0x9e, 0xb7, 0xd6);
pub const USED_RGB: (u8, u8, u8) = (0x1f, 0x6f, 0x3f);

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// JSON safe inside `<script>`: no `</script>` or `<!--` can close or open anything.
fn script_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into()).replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026")
}

pub fn render(r: &Report, title: &str) -> String {
    let data: Vec<serde_json::Value> = r.owners.iter().map(|o| serde_json::json!({"owner": o.owner, "granted": o.granted, "used": o.used})).collect();
    let mut rows = String::new();
    for o in &r.owners {
        for g in &o.grants_used {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td></tr>\n",
                esc(&o.owner),
                esc(&g.grant.rule),
                esc(g.grant.intent.as_deref().unwrap_or("(no intent)")),
                esc(g.grant.resource.as_deref().unwrap_or("(any)")),
                esc(g.grant.tool.as_deref().unwrap_or("")),
                g.uses
            ));
        }
        for g in &o.grants_unused {
            rows.push_str(&format!(
                "<tr class=unused><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>unused</td></tr>\n",
                esc(&o.owner),
                esc(&g.rule),
                esc(g.intent.as_deref().unwrap_or("(no intent)")),
                esc(g.resource.as_deref().unwrap_or("(any)")),
                esc(g.tool.as_deref().unwrap_or(""))
            ));
        }
    }
    let mut denials = String::new();
    for o in &r.owners {
        for (reason, n) in &o.denials {
            denials.push_str(&format!("<tr><td>{}</td><td>{}</td><td class=n>{n}</td></tr>\n", esc(&o.owner), esc(reason)));
        }
        for d in &o.dry_run_would_deny {
            denials.push_str(&format!("<tr><td>{}</td><td>dry run: {} ({})</td><td class=n>{}</td></tr>\n", esc(&o.owner), esc(&d.reason), esc(&d.rule), d.count));
        }
    }
    let mut classes = String::new();
    for c in &r.principals {
        classes.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>\n",
            esc(&c.class),
            esc(&c.owner),
            esc(&c.patterns.join(" ")),
            c.counts.allowed,
            c.counts.denied,
            c.counts.dry_run_denied,
            c.principals_seen
        ));
    }
    let mut broad = String::new();
    for b in &r.broadest_grants {
        broad.push_str(&format!(
            "<li><b>{}</b> × {} × {}: {} (used {}×)</li>\n",
            esc(&b.grant.rule),
            esc(b.grant.intent.as_deref().unwrap_or("(no intent)")),
            esc(b.grant.resource.as_deref().unwrap_or("(any)")),
            esc(&b.why),
            b.uses
        ));
    }
    let mut never = String::new();
    for i in &r.intents_never_allowed {
        never.push_str(&format!("<li>{} ({} claims{})</li>\n", esc(&i.intent), i.claimed, if i.defined { "" } else { ", not in the policy" }));
    }
    let mut edges = String::new();
    for e in &r.delegation_edges {
        edges.push_str(&format!(
            "<li>{} → {} for {}: {} ({}×)</li>\n",
            esc(&e.from),
            esc(&e.to),
            esc(&e.intent),
            esc(e.rule.as_deref().unwrap_or("no delegation rule")),
            e.uses
        ));
    }
    for d in &r.delegation_rules_unused {
        edges.push_str(&format!("<li class=unused>delegation rule {} unused</li>\n", esc(d)));
    }
    let l = &r.log;
    let (g, u) = (GRANTED_RGB, USED_RGB);
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1a202c;background:#fff}}
table{{border-collapse:collapse;margin:8px 0 24px}} td,th{{border-bottom:1px solid #e2e8f0;padding:3px 10px;text-align:left}}
td.n{{text-align:right}} tr.unused td{{color:#c53030}} .legend span{{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}}
</style></head>
<body data-chart="pending">
<h1>{title}</h1>
<p>{records} records ({allowed} allowed, {denied} denied, {dry} dry-run would-deny); {skipped} lines skipped.</p>
<h2>Grants used against granted, per owner</h2>
<div class="legend"><span style="background:rgb({g0},{g1},{g2})"></span>granted<span style="background:rgb({u0},{u1},{u2})"></span>used</div>
<svg id="chart" width="760" height="10" role="img" aria-label="grants used against granted per owner"></svg>
<p id="chart-status">chart not drawn</p>
<h2>Grants</h2>
<table><tr><th>owner</th><th>rule</th><th>intent</th><th>resource</th><th>tool</th><th>uses</th></tr>
{rows}</table>
<h2>Denials and dry-run would-denials</h2>
<table><tr><th>owner</th><th>reason</th><th>count</th></tr>
{denials}</table>
<h2>Per principal pattern</h2>
<table><tr><th>class</th><th>owner</th><th>patterns</th><th>allowed</th><th>denied</th><th>dry run</th><th>principals seen</th></tr>
{classes}</table>
<h2>Broadest grants</h2><ul>{broad}</ul>
<h2>Intents claimed but never allowed</h2><ul>{never}</ul>
<h2>Delegation edges used</h2><ul>{edges}</ul>
<script id="data" type="application/json">{data}</script>
<script>
(function () {{
  var data = JSON.parse(document.getElementById('data').textContent);
  var svg = document.getElementById('chart'), ns = 'http://www.w3.org/2000/svg';
  var max = 1; data.forEach(function (d) {{ if (d.granted > max) max = d.granted; }});
  var row = 34, left = 200, width = 520, bars = 0;
  svg.setAttribute('height', String(Math.max(row * data.length + 10, 20)));
  function el(name, attrs, text) {{
    var e = document.createElementNS(ns, name);
    for (var k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  }}
  data.forEach(function (d, i) {{
    var y = 6 + i * row;
    el('text', {{x: 0, y: y + 18, 'font-size': 13}}, d.owner);
    el('rect', {{x: left, y: y, width: Math.max(d.granted ? 2 : 0, width * d.granted / max), height: 12, fill: 'rgb({g0},{g1},{g2})'}}); bars++;
    el('rect', {{x: left, y: y + 13, width: Math.max(d.used ? 2 : 0, width * d.used / max), height: 12, fill: 'rgb({u0},{u1},{u2})'}}); bars++;
    el('text', {{x: left + width + 8, y: y + 18, 'font-size': 12}}, d.used + ' / ' + d.granted);
  }});
  document.getElementById('chart-status').textContent = 'chart drawn: ' + data.length + ' owners, ' + bars + ' bars';
  document.body.setAttribute('data-chart', 'drawn');
}})();
</script>
</body></html>
"##,
        title = esc(title),
        records = l.records,
        allowed = l.allowed,
        denied = l.denied,
        dry = l.dry_run_denied,
        skipped = l.skipped.values().sum::<u64>(),
        g0 = g.0,
        g1 = g.1,
        g2 = g.2,
        u0 = u.0,
        u1 = u.1,
        u2 = u.2,
        data = script_json(&data),
    )
}
