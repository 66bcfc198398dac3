// The labelling page of label.py: for each prompt of a round, the person picks the best and the worst image;
// each answer is POSTed at once and the server writes it to labels/<annotator>.json (human_feedback.py's format:
// scores 1 for the best, -1 for the worst, 0 for the others; all 0 when they are alike; null when unlabelled).
"use strict";

const NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;  // human_feedback.ANNOTATOR: a safe file name
const $ = (id) => document.getElementById(id);
let round = null;    // {path, size, images_per_prompt, prompts}, from /api/round
let entries = null;  // the annotator's label file, as the server last wrote it
let annotator = null;
let current = 0;     // the prompt shown
let pick = {best: null, worst: null, alike: false};  // the answer being given for it
let busy = false;    // an answer is being saved

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function message(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

const isLabelled = (entry) => entry.scores.some((s) => s !== null);

function firstUnlabelled(from) {
  const n = entries.length;
  for (let i = 0; i < n; i++) {
    if (!isLabelled(entries[(from + i) % n])) return (from + i) % n;
  }
  return -1;
}

function pickFromScores(scores) {
  if (scores.every((s) => s === null)) return {best: null, worst: null, alike: false};
  const top = Math.max(...scores), bottom = Math.min(...scores);
  if (top === bottom) return {best: null, worst: null, alike: true};
  return {best: scores.indexOf(top), worst: scores.indexOf(bottom), alike: false};
}

function scoresFromPick() {
  const scores = new Array(round.images_per_prompt).fill(0);
  if (pick.best !== null) scores[pick.best] = 1;
  if (pick.worst !== null) scores[pick.worst] = -1;
  return scores;
}

function imageSize() {  // small images: a whole multiple of their pixels, so that they stay sharp
  const k = round.images_per_prompt;
  const room = Math.max(128, Math.min(320, ($("images").clientWidth - 12 * (k - 1)) / k - 10));
  return round.size <= room ? round.size * Math.floor(room / round.size) : Math.floor(room);
}

function buildImages() {
  const box = $("images"), size = imageSize();
  box.replaceChildren();
  for (let k = 0; k < round.images_per_prompt; k++) {
    const figure = document.createElement("figure"), img = document.createElement("img");
    figure.id = `image-${k}`;
    img.src = `/image/${current}/${k}.png`;
    img.alt = `image ${k + 1} of prompt ${current + 1}`;
    img.width = img.height = size;
    if (size < round.size) img.className = "shrunk";  // large images, made smaller: smoothed
    const caption = document.createElement("figcaption"), mark = document.createElement("span");
    caption.textContent = String(k + 1);
    mark.className = "mark";
    figure.append(img, caption, mark);
    figure.addEventListener("click", () => choose(k));
    box.append(figure);
  }
}

function render() {
  const n = entries.length, done = entries.filter(isLabelled).length;
  $("progress-bar").max = n;
  $("progress-bar").value = done;
  $("progress-text").textContent = `${done} of ${n} prompts labelled`;
  $("prompt-number").textContent = current + 1;
  $("prompt-count").textContent = n;
  $("prompt-text").textContent = round.prompts[current];
  $("prompt-state").textContent = isLabelled(entries[current]) ? "· labelled" : "";
  $("prompt-state").className = isLabelled(entries[current]) ? "labelled" : "";
  for (let k = 0; k < round.images_per_prompt; k++) {
    const figure = $(`image-${k}`), best = pick.best === k, worst = pick.worst === k;
    if (!figure) continue;  // the round done before any prompt was shown
    figure.className = best ? "best" : worst ? "worst" : pick.alike ? "alike" : "";
    figure.querySelector(".mark").textContent = best ? "best" : worst ? "worst" : "";
  }
  $("instruction").textContent = pick.alike ? "All alike: no image is better than another."
    : pick.best === null ? "Click (or press the number of) the BEST image."
    : pick.worst === null ? "Now the WORST image (click the best again to take it back)."
    : "Best and worst saved.";
}

function show(section) {
  for (const id of ["name-form", "task", "done"]) $(id).hidden = id !== section;
  $("progress").hidden = $("who").hidden = section === "name-form";
}

function goTo(p) {
  current = Math.max(0, Math.min(entries.length - 1, p));
  pick = pickFromScores(entries[current].scores);
  show("task");
  buildImages();
  render();
}

function finishOrNext() {
  const next = firstUnlabelled(current + 1);
  if (next === -1) {
    show("done");
    render();
    $("label-path").textContent = `${round.path}/labels/${annotator}.json`;
    $("train-command").textContent = `python d3po.py --labels ${round.path} --output-dir ${round.path}-trained`;
  } else {
    goTo(next);
  }
}

async function save(scores) {  // true once the server has written the answer
  busy = true;
  try {
    entries = await api(`/api/labels/${annotator}`, {prompt: current, scores: scores});
    message(`saved prompt ${current + 1}`);
    return true;
  } catch (error) {
    message(`Not saved: ${error.message}`, true);
    return false;
  } finally {
    busy = false;
    render();
  }
}

async function answered() {  // a whole answer: save it, then on to the next prompt left to label
  if (await save(scoresFromPick())) finishOrNext();
}

function choose(k) {
  if (busy || $("task").hidden || k >= round.images_per_prompt) return;
  if (pick.alike || (pick.best !== null && pick.worst !== null)) {
    pick = {best: k, worst: null, alike: false};  // a new answer for a labelled prompt
  } else if (pick.best === null) {
    pick.best = k;
    if (round.images_per_prompt === 2) pick.worst = 1 - k;  // of two, the other one is the worst
  } else if (k === pick.best) {
    pick.best = null;
  } else {
    pick.worst = k;
  }
  render();
  if (pick.best !== null && pick.worst !== null) answered();
}

function alike() {
  if (busy || $("task").hidden) return;
  pick = {best: null, worst: null, alike: true};
  render();
  answered();
}

function clear() {
  if (busy || $("task").hidden) return;
  pick = {best: null, worst: null, alike: false};
  save(new Array(round.images_per_prompt).fill(null));
}

async function begin(name) {
  try {
    entries = await api(`/api/labels/${encodeURIComponent(name)}`);
  } catch (error) {
    show("name-form");
    message(error.message, true);
    return;
  }
  annotator = name;
  try { localStorage.setItem("annotator", name); } catch (error) { /* storage blocked: ask again next time */ }
  $("annotator").textContent = name;
  message("");
  const next = firstUnlabelled(0);
  if (next === -1) {
    current = entries.length - 1;
    finishOrNext();
  } else {
    goTo(next);
  }
}

const KEYS = {
  a: alike, A: alike, Backspace: clear, Delete: clear,
  ArrowLeft: () => $("task").hidden || goTo(current - 1),
  ArrowRight: () => $("task").hidden || goTo(current + 1),
};

document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey || !entries) return;
  const action = /^[1-9]$/.test(event.key) ? () => choose(Number(event.key) - 1) : KEYS[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
});

async function start() {
  try {
    round = await api("/api/round");
  } catch (error) {
    message(`The server does not answer: ${error.message}`, true);
    return;
  }
  $("round-name").textContent = round.path;
  document.title = `Label ${round.path}`;
  $("previous").addEventListener("click", () => goTo(current - 1));
  $("next").addEventListener("click", () => goTo(current + 1));
  $("alike").addEventListener("click", alike);
  $("clear").addEventListener("click", clear);
  $("review").addEventListener("click", () => goTo(0));
  $("change-name").addEventListener("click", () => { show("name-form"); $("name-input").focus(); });
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (NAME.test(name)) begin(name);
    else message("A name of 1 to 64 letters, digits, _ or -, starting with a letter or digit.", true);
  });
  let saved = new URLSearchParams(location.search).get("annotator");
  try { saved = saved || localStorage.getItem("annotator"); } catch (error) { /* storage blocked */ }
  if (saved && NAME.test(saved)) {
    begin(saved);
  } else {
    show("name-form");
    $("name-input").focus();
  }
}

start();
