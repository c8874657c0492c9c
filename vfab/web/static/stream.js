// The WebSocket at /ws (contract section 4): subscribe, hand messages on,
// and come back after the daemon restarts or the network drops.

const CHANNELS = ["system", "jobs", "device"];
// The subprotocol the daemon answers; the key goes beside it as a token.
const SUBPROTOCOL = "vfab";
const KEY_TOKEN = "vfab.key.";
const CLOSE_UNAUTHORIZED = 4401;
const FIRST_RETRY_MS = 1000;
const LONGEST_RETRY_MS = 30000;

export class Stream {
  // handlers: onMessage(message), onState(state, detail), onAuthRequired(reason),
  // onRefused() (an upgrade with the key failed: the HTTP API can say whether
  // the key was why); state is "connecting", "live", "waiting" (detail: seconds
  // to the retry) or "locked" (the key is missing or wrong; connect() again
  // once there is one).
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
    // A browser cannot set headers on a WebSocket, and a key in the URL could
    // end up in proxy logs: the key goes in the upgrade as a subprotocol token,
    // so that the daemon counts this as a client with a key from the start
    // (clients without one share a small budget that a flood can fill).
    const key = this.getKey();
    const protocols = key ? [SUBPROTOCOL, keyToken(key)] : [SUBPROTOCOL];
    const socket = new WebSocket(`${scheme}//${location.host}/ws`, protocols);
    this.socket = socket;
    this.handlers.onState("connecting");
    let opened = false;

    socket.addEventListener("open", () => {
      opened = true;
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
      if (!opened && key) {
        // A refused upgrade (401 for a wrong key, but also 503 or a daemon that
        // is down) shows in a browser only as 1006; the HTTP API tells them apart.
        this.handlers.onRefused();
      }
    });
  }

  lock(reason) {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
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

// The key as a Sec-WebSocket-Protocol token: "vfab.key." and its UTF-8 bytes in
// base64url without padding, which holds only token characters.
export function keyToken(key) {
  const bytes = new TextEncoder().encode(key);
  let binary = "";
  for (const byte of bytes) {
    binary += String.fromCharCode(byte);
  }
  const base64url = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return KEY_TOKEN + base64url;
}
