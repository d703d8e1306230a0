// The report page: the run's test metrics (from /v1/model), confusion matrices and its plots.
"use strict";

const f3 = value => (value === null || value === undefined) ? "\u2014" : Number(value).toFixed(3);

function table(header, rows, id) {
  const element = document.createElement("table");
  if (id) element.id = id;
  const head = element.createTHead().insertRow();
  for (const name of header) head.append(Object.assign(document.createElement("th"), { textContent: name }));
  const body = element.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const cell of row) tr.insertCell().textContent = cell;
  }
  return element;
}

// Plots go through fetch so the API key header is sent; an <img src> could not send it.
async function plotImage(name) {
  const response = await fetch(`/report/plots/${encodeURIComponent(name)}`, { headers: apiHeaders() });
  if (!response.ok) return null;
  const image = document.createElement("img");
  image.className = "plot";
  image.alt = name;
  image.src = URL.createObjectURL(await response.blob());
  return image;
}

async function load() {
  const status = document.getElementById("status");
  status.className = "";
  const response = await fetch("/v1/model", { headers: apiHeaders() });
  if (!response.ok) {
    status.className = "error";
    status.textContent = await errorMessage(response);
    return;
  }
  const info = await response.json();
  status.textContent = "";
  document.getElementById("summary").textContent =
    `Base model ${info.base_model}; adapter ${info.adapter}` + (info.run ? `; run ${info.run}` : "");
  const metrics = info.metrics;
  const metricsBox = document.getElementById("metrics");
  const confusionBox = document.getElementById("confusion");
  if (!metrics) {
    metricsBox.textContent = "No metrics.json: serve a run folder (--run) to see its metrics.";
    confusionBox.replaceChildren();
  } else {
    metricsBox.replaceChildren(table(
      ["stage", "mode", "n", "macro-F1", "macro-recall", "accuracy", "4-class macro-F1", "unparsed"],
      metrics.test.map(r => [r.stage, r.mode, r.n, f3(r.macro_f1), f3(r.macro_recall), f3(r.accuracy),
                             f3(r.macro_f1_4class), r.unparsed ?? "\u2014"]),
      "metrics-table"));
    confusionBox.replaceChildren(...metrics.test.filter(r => r.confusion).map(r => {
      const box = document.createElement("div");
      const title = document.createElement("h3");
      title.textContent = `${r.stage}, ${r.mode} (rows: true label, columns: predicted)`;
      const columns = r.confusion_columns || ["negative", "neutral", "positive"];
      const rows = r.confusion.map((counts, i) => [columns[i], ...counts]);
      box.append(title, table(["true \\ predicted", ...columns], rows));
      return box;
    }));
  }
  const images = await Promise.all(info.plots.map(plotImage));
  document.getElementById("plots").replaceChildren(...images.filter(Boolean));
}

setUpKeyField().then(load);
document.getElementById("reload").addEventListener("click", load);
