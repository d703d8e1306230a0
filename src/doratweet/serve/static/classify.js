// The classify page: send the non-blank lines to /v1/classify, draw a label and three bars per tweet.
"use strict";

const LABELS = ["negative", "neutral", "positive"];
let limits = { max_texts: 256 };

function resultElement(text, prediction) {
  const item = document.createElement("div");
  item.className = "result";
  const line = document.createElement("div");
  line.className = "text";
  const label = document.createElement("span");
  label.className = "label " + prediction.label;
  label.textContent = prediction.label;
  line.append(label, " \u2014 ", text);  // textContent only: a tweet is never parsed as HTML
  item.append(line);
  for (const name of LABELS) {
    const p = prediction.probabilities[name];
    const row = document.createElement("div");
    row.className = "bar-row";
    row.innerHTML = `<span class="name">${name}</span><span class="bar-track"><span class="bar ${name}"></span></span>` +
      `<span class="value">${(100 * p).toFixed(1)}%</span>`;
    row.querySelector(".bar").style.width = (100 * p).toFixed(1) + "%";
    row.dataset.label = name;
    row.dataset.probability = p;
    item.append(row);
  }
  return item;
}

async function classify() {
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  const texts = document.getElementById("tweets").value.split("\n").map(t => t.trim()).filter(t => t);
  status.className = "";
  if (texts.length === 0) { status.textContent = "Type or paste at least one tweet."; return; }
  if (texts.length > limits.max_texts) {
    status.className = "error";
    status.textContent = `${texts.length} tweets; the server takes at most ${limits.max_texts} at once.`;
    return;
  }
  status.textContent = "Classifying\u2026";
  const started = performance.now();
  const response = await fetch("/v1/classify", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...apiHeaders() },
    body: JSON.stringify({ texts }),
  });
  if (!response.ok) {
    status.className = "error";
    status.textContent = await errorMessage(response);
    return;
  }
  const body = await response.json();
  results.replaceChildren(...body.results.map((prediction, i) => resultElement(texts[i], prediction)));
  status.textContent = `${texts.length} tweet(s) in ${Math.round(performance.now() - started)} ms`;
  if (!document.getElementById("model").textContent.trim()) showModel();  // the key may have just been typed
}

async function showModel() {
  const response = await fetch("/v1/model", { headers: apiHeaders() });
  if (response.ok) {
    const info = await response.json();
    // Which model answers, and how well it did on the test split (label scoring, as this page uses).
    const after = info.metrics && info.metrics.test.find(r => r.stage === "after" && r.mode === "score");
    const figures = after ? `; on ${after.n} test tweets: macro-F1 ${Number(after.macro_f1).toFixed(3)}, ` +
      `macro-recall ${Number(after.macro_recall).toFixed(3)}, accuracy ${Number(after.accuracy).toFixed(3)}` : "";
    document.getElementById("model").textContent = `Base model ${info.base_model}, adapter ${info.adapter}${figures}`;
  }
}

document.getElementById("classify").addEventListener("click", () => classify().catch(error => {
  const status = document.getElementById("status");
  status.className = "error";
  status.textContent = String(error);
}));
setUpKeyField().then(config => { limits = config; showModel(); });
