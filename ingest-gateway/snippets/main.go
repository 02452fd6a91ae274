package main

import (
{% if auth.kind in ["hmac", "standard-webhooks"] %}
	"crypto/hmac"
	"crypto/sha256"
{% endif %}
{% if auth.kind == "standard-webhooks" or (auth.kind == "hmac" and auth.base64) %}
	"encoding/base64"
{% elif auth.kind == "hmac" %}
	"encoding/hex"
{% endif %}
	"encoding/json"
	"fmt"
	"io"
	"net/http"
{% if auth.kind != "none" %}
	"os"
{% endif %}
	"strconv"
	"strings"
	"time"
)

const (
	url            = "{{ url }}"
	body           = "{{ body }}"
	idempotencyKey = "{{ key }}" // one key per order status change
)

{% if auth.kind == "none" %}
func setAuth(req *http.Request) {}
{% elif auth.kind == "bearer" %}
func setAuth(req *http.Request) {
	req.Header.Set("Authorization", "Bearer "+os.Getenv("{{ secret_env }}"))
}
{% elif auth.kind == "hmac" %}
{% set encode = "base64.StdEncoding.EncodeToString(mac.Sum(nil))" if auth.base64 else "hex.EncodeToString(mac.Sum(nil))" %}
func setAuth(req *http.Request) {
{% if auth.ts_header %}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
{% endif %}
	mac := hmac.New(sha256.New, []byte(os.Getenv("{{ secret_env }}")))
{% if auth.ts_header %}
	mac.Write([]byte(ts + "." + body))
	req.Header.Set("{{ auth.ts_header }}", ts)
{% else %}
	mac.Write([]byte(body))
{% endif %}
	req.Header.Set("{{ auth.header }}", "{{ auth.prefix }}"+{{ encode }})
}
{% elif auth.kind == "standard-webhooks" %}
// Standard Webhooks: HMAC-SHA256 of "<id>.<timestamp>.<body>" keyed by the secret's base64
// part; the id is the idempotency key (the webhook-id header).
func setAuth(req *http.Request) {
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(os.Getenv("{{ secret_env }}"), "whsec_"))
	if err != nil {
		panic("{{ secret_env }} is not whsec_<base64>")
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(idempotencyKey + "." + ts + "." + body))
	req.Header.Set("webhook-timestamp", ts)
	req.Header.Set("webhook-signature", "v1,"+base64.StdEncoding.EncodeToString(mac.Sum(nil)))
}
{% endif %}

func send(client *http.Client) (string, error) {
	for attempt := 0; attempt < 6; attempt++ {
		req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
		if err != nil {
			return "", err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("{{ key_header }}", idempotencyKey)
		setAuth(req)
		resp, err := client.Do(req)
		if err != nil { // connection error or timeout
			time.Sleep(time.Duration(min(1<<attempt, 30)) * time.Second)
			continue
		}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 429 || resp.StatusCode == 503 {
			wait, err := strconv.Atoi(resp.Header.Get("Retry-After"))
			if err != nil || wait < 1 {
				wait = 1
			}
			time.Sleep(time.Duration(wait) * time.Second)
			continue
		}
		if resp.StatusCode < 200 || resp.StatusCode > 299 {
			return "", fmt.Errorf("webhook refused: %d %s", resp.StatusCode, answer)
		}
		var accepted struct {
			HitID string `json:"hit_id"`
		}
		if err := json.Unmarshal(answer, &accepted); err != nil {
			return "", err
		}
		return accepted.HitID, nil
	}
	return "", fmt.Errorf("gave up after 6 attempts")
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func main() {
	hitID, err := send(&http.Client{Timeout: 10 * time.Second})
	if err != nil {
		panic(err)
	}
	fmt.Println(hitID)
}
