// The WebSocket at /ws (contract section 4): subscribe, hand messages on,
// and come back after the daemon restarts or the network drops.

const CHANNELS = ["system", "jobs", "device"];
const CLOSE_UNAUTHORIZED = 4401;
const FIRST_RETRY_MS = 1000;
const LONGEST_RETRY_MS = 30000;

export class Stream {
  // handlers: onMessage(message), onState(state, detail), onAuthRequired(reason);
  // state is "connecting", "live", "waiting" (detail: seconds to the retry)
  // or "locked" (the key is missing or wrong; connect() again once there is one).
  constructor(getKey, handlers) {
    this.getKey = getKey;
    this.handlers = handlers;
    this.socket = null;
    this.retryMs = FIRST_RETRY_MS;
    this.retryTimer = null;
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.socket) {
      // Forget the old socket first so its close does not schedule a retry.
      const old = this.socket;
      this.socket = null;
      old.close();
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // The key goes in the first message rather than in the URL, where it could
    // end up in proxy logs; a wrong key then closes with 4401 and a reason.
    const socket = new WebSocket(`${scheme}//${location.host}/ws`);
    this.socket = socket;
    this.handlers.onState("connecting");

    socket.addEventListener("open", () => {
      const key = this.getKey();
      if (key) {
        socket.send(JSON.stringify({ type: "AUTH", api_key: key }));
      }
      socket.send(JSON.stringify({ type: "SUBSCRIBE", channels: CHANNELS }));
    });

    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        return;  // the daemon only sends JSON; anything else is not ours to show
      }
      if (message.type === "subscribed") {
        this.retryMs = FIRST_RETRY_MS;  // a good connection resets the backoff
        this.handlers.onState("live");
      } else if (message.type === "error" && message.error_code === "auth_required") {
        // Sent at once when we subscribed without a key the daemon wants;
        // waiting for its 4401 close would take its whole AUTH timeout.
        this.lock("this daemon needs an API key");
        return;
      }
      this.handlers.onMessage(message);
    });

    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) {
        return;
      }
      this.socket = null;
      if (event.code === CLOSE_UNAUTHORIZED) {
        this.handlers.onState("locked");
        this.handlers.onAuthRequired(event.reason || "the API key is wrong");
        return;
      }
      this.scheduleRetry();
    });
  }

  lock(reason) {
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.close();
    }
    this.handlers.onState("locked");
    this.handlers.onAuthRequired(reason);
  }

  scheduleRetry() {
    // Exponential backoff with jitter, so that many dashboards do not all
    // knock at once when a restarted daemon comes back.
    const delay = Math.min(this.retryMs, LONGEST_RETRY_MS) * (0.75 + Math.random() * 0.5);
    this.retryMs = Math.min(this.retryMs * 2, LONGEST_RETRY_MS);
    this.handlers.onState("waiting", Math.round(delay / 1000));
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}
