"""The sandbox EHR's few HTML pages (Jinja2, autoescaped): approval, error, the EHR patient list."""

from __future__ import annotations

from jinja2 import Environment, select_autoescape

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} — Sandbox EHR</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; color: #1b1f24; }
 h1 { font-size: 1.4rem; } .muted { color: #59636e; } .error { color: #a40e26; }
 fieldset { border: 1px solid #d0d7de; border-radius: 6px; margin: 1rem 0; }
 table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: .3rem .5rem;
 border-bottom: 1px solid #d0d7de; } button { padding: .4rem 1rem; margin-right: .5rem; }
 code { background: #f6f8fa; padding: 0 .2rem; }
 body.chart { max-width: none; margin: 0; } body.chart header, body.chart .chart-head { padding: .3rem 1rem; }
 .chart-head { background: #1f3550; color: #fff; } .chart-head .muted { color: #d5dde6; }
 .chart-head code { color: #1b1f24; } .chart-head a { color: #fff; }
 iframe.app { display: block; width: 100%; height: calc(100vh - 6rem); border: 0; border-top: 1px solid #d0d7de; }
 a { display: inline-block; min-height: 24px; padding: 2px 0; }
</style></head><body>
<header><p class="muted">Sandbox EHR — synthetic data only</p></header>
<main>
{% block body %}{% endblock %}
</main>
</body></html>"""

_CONSENT = _env.from_string(
    _BASE.replace(
        "{% block body %}{% endblock %}",
        """
<h1>{{ client_name }} asks for access</h1>
{% if message %}<p class="error">{{ message }}</p>{% endif %}
<form method="post" action="{{ action }}">
 <input type="hidden" name="pending" value="{{ pending_id }}">
 {% if patient %}<p>Patient in context: <code>{{ patient }}</code>{% if encounter %},
 encounter <code>{{ encounter }}</code>{% endif %}</p>{% endif %}
 {% if needs_patient %}
 <fieldset><legend>Choose the patient</legend>
  {% if patients %}
  <select name="patient" required>
   {% for p in patients %}<option value="{{ p.id }}" {% if p.id == hint %}selected{% endif %}>
     {{ p.label }} ({{ p.id }})</option>{% endfor %}
  </select>
  {% else %}
  <label>Patient id <input name="patient" value="{{ hint or '' }}" required pattern="[A-Za-z0-9.\\-]{1,64}"></label>
  {% endif %}
 </fieldset>
 {% endif %}
 <fieldset><legend>Permissions</legend>
  <ul>
  {% for s in read_scopes %}<li><code>{{ s }}</code></li>{% endfor %}
  {% for s in write_scopes %}<li><label><input type="checkbox" name="write_scope" value="{{ s }}" checked>
    <code>{{ s }}</code> (write — untick to refuse; any read in it stays)</label></li>{% endfor %}
  </ul>
 </fieldset>
 <button type="submit" name="decision" value="approve">Approve</button>
 <button type="submit" name="decision" value="deny">Deny</button>
</form>""",
    )
)

_ERROR = _env.from_string(
    _BASE.replace(
        "{% block body %}{% endblock %}",
        """
<h1>{{ title }}</h1>
<p class="error">{{ message }}</p>
<p class="muted">The request cannot be sent back to the app, because the app or its redirect address
could not be confirmed.</p>""",
    )
)

_EHR = _env.from_string(
    _BASE.replace(
        "{% block body %}{% endblock %}",
        """
<h1>Patients</h1>
{% if message %}<p class="error">{{ message }}</p>{% endif %}
{% if not apps %}<p class="muted">No app with a launch_url is registered.</p>{% endif %}
<table><caption class="muted">Every patient on the FHIR server; "Launch app" opens the chart with the app
embedded.</caption><tr><th>Patient</th><th>Encounter</th>{% for app in apps %}<th>{{ app.name }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.label }} <span class="muted">({{ row.patient }})</span></td>
 <td>{{ row.encounter or "—" }}</td>
 {% for app in apps %}<td><a href="{{ row.links[app.client_id] }}">Launch app</a></td>{% endfor %}</tr>
{% endfor %}</table>""",
    )
)


_CHART = _env.from_string(
    _BASE.replace("<body>", '<body class="chart">').replace(
        "{% block body %}{% endblock %}",
        """
<div class="chart-head"><h1>Chart{% if patient %}: <code>{{ patient }}</code>{% endif %}</h1>
{% if encounter %}<span class="muted">Encounter {{ encounter }}</span>{% endif %} <a href="/ehr">Patient list</a></div>
<iframe class="app" src="{{ src }}" title="SMART app in this patient's chart"></iframe>""",
    )
)


def chart_page(**values) -> str:
    return _CHART.render(title="Chart", **values)


def consent_page(**values) -> str:
    return _CONSENT.render(title="Approve access", **values)


def error_page(title: str, message: str) -> str:
    return _ERROR.render(title=title, message=message)


def ehr_page(**values) -> str:
    return _EHR.render(title="Patients", **values)
