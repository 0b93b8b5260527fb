// The deepcount web page: upload a photo to POST /v1/count and show the count and overlay.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form"), file = $("file"), submit = $("submit"), status = $("status");
  // A count in prose, as a person says it: "about 89 people" (the exact figure is in the details
  // line and the JSON).
  const aboutPeople = (c) => {
    const n = Math.round(c);
    return n === 0 ? "almost no one" : n === 1 ? "about 1 person" : `about ${n.toLocaleString("en")} people`;
  };
  const error = $("error"), result = $("result"), count = $("count"), overlay = $("overlay");

  function showError(text) {
    error.textContent = text;
    error.hidden = false;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    error.textContent = "";
    result.hidden = true;
    count.textContent = "";
    delete count.dataset.count;
    overlay.hidden = true;
    overlay.removeAttribute("src");

    const photo = file.files[0];
    if (!photo) {
      showError("Choose a photo first.");
      return;
    }
    const density = $("density").checked;
    const body = new FormData();
    body.append("image", photo);

    submit.disabled = true;
    status.textContent = "Counting\u2026";
    try {
      const response = await fetch("/v1/count" + (density ? "?density=1" : ""),
                                   { method: "POST", body: body });
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
      if (!response.ok) {
        const detail = data && data.detail !== undefined
          ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail))
          : response.statusText;
        showError(`Error ${response.status}: ${detail}`);
        status.textContent = "";
        return;
      }
      count.dataset.count = String(data.count);
      count.textContent = aboutPeople(data.count);
      $("details").textContent =
        `Exact count ${data.count.toFixed(2)}; ` +
        `${data.width}\u00d7${data.height} pixels, ${data.tiles} tile${data.tiles === 1 ? "" : "s"}, ` +
        `${data.seconds.toFixed(2)} s (${data.tiling} tiling)`;
      $("model").textContent = `Model: ${data.description}`;
      $("model").classList.toggle("warn", /baseline|untrained/i.test(data.description));
      if (data.density_png) {
        overlay.src = "data:image/png;base64," + data.density_png;
        overlay.hidden = false;
      }
      result.hidden = false;
      status.textContent = "";
    } catch (e) {
      showError(`Could not reach the server: ${e.message}`);
      status.textContent = "";
    } finally {
      submit.disabled = false;
    }
  });
})();
