// Idle timeout: warn a minute before the server ends the session; "stay signed in" renews it.
(function () {
  var body = document.body;
  var idle = parseInt(body.getAttribute("data-idle-seconds") || "0", 10);
  if (!idle) { return; }
  var box = document.getElementById("idle-warning");
  var warnTimer, endTimer;
  function schedule() {
    clearTimeout(warnTimer); clearTimeout(endTimer);
    warnTimer = setTimeout(function () { box.hidden = false; document.getElementById("stay-signed-in").focus(); },
                           Math.max(0, idle - 60) * 1000);
    endTimer = setTimeout(function () { window.location = body.getAttribute("data-signed-out"); }, idle * 1000);
  }
  document.getElementById("stay-signed-in").addEventListener("click", function () {
    fetch(body.getAttribute("data-keepalive"), {credentials: "same-origin"}).then(function (r) {
      if (r.ok) { box.hidden = true; schedule(); } else { window.location = body.getAttribute("data-signed-out"); }
    });
  });
  schedule();
})();
